"""keras-hub ESM backbone presets (config.json + model.weights.h5) as a conversion source."""

from __future__ import annotations

import os

import numpy as np
import pytest

import esm_dual
import esm_dual.conversion as conv
from esm_dual.io.base import CheckpointError
from esm_dual.io.hub import load_checkpoint

keras_hub = pytest.importorskip("keras_hub")


def _preset(directory: str, position_embedding_type: str) -> object:
    backbone = keras_hub.models.ESMBackbone(
        vocabulary_size=33, num_layers=2, num_heads=3, hidden_dim=12, intermediate_dim=25, dropout=0.0,
        max_sequence_length=40, layer_norm_eps=1e-5, use_pre_layer_norm=position_embedding_type == "absolute",
        position_embedding_type=position_embedding_type, pad_token_id=1)
    rng = np.random.default_rng(0)
    for w in backbone.weights:
        w.assign(rng.normal(0, 0.3, size=tuple(w.shape)).astype("float32") + (1.0 if w.name == "gamma" else 0.0))
    backbone.save_to_preset(directory)
    return backbone


@pytest.mark.parametrize("position_embedding_type", ["rotary", "absolute"])
def test_keras_hub_preset_to_hub_and_keras(tmp_path, position_embedding_type):
    src = str(tmp_path / "preset")
    backbone = _preset(src, position_embedding_type)
    assert conv.detect_format(src) == "keras-hub"
    out = str(tmp_path / "hub")
    r = esm_dual.convert(src, out, to="hf", verify=True)
    assert r.source_format == "keras-hub" and set(r.verify) == {"last_hidden_state"}
    assert r.verify["last_hidden_state"] <= 1e-4
    assert any("token dropout" in n for n in r.notes)
    ck = load_checkpoint(out)
    assert ck.config.architectures == ["EsmModel"]
    assert ck.config.position_embedding_type == position_embedding_type
    assert ck.config.emb_layer_norm_before == (position_embedding_type == "absolute")
    # weights mapped as they are (no shift, kernels transposed to Linear.weight)
    q = backbone.transformer_layers[1].attention_layer.q_dense.kernel.numpy()
    np.testing.assert_array_equal(ck.tensors["encoder.layer.1.attention.self.query.weight"], q.reshape(12, -1).T)
    np.testing.assert_array_equal(ck.tensors["embeddings.word_embeddings.weight"],
                                  backbone.token_embedding.embeddings.numpy())
    r = esm_dual.convert(src, str(tmp_path / "m.keras"), to="keras", verify=True)
    assert r.verify["last_hidden_state"] <= 1e-4


def test_keras_hub_not_esm(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text('{"module": "keras_hub.src.models.bert.bert_backbone", '
                                   '"class_name": "BertBackbone", "config": {}, "registered_name": '
                                   '"keras_hub>BertBackbone"}')
    (d / "model.weights.h5").write_bytes(b"")
    with pytest.raises(CheckpointError, match="BertBackbone preset, not an ESM backbone"):
        esm_dual.convert(str(d), str(tmp_path / "o"), to="hf")
    assert not os.path.exists(tmp_path / "o")
