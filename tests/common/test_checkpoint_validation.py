"""Malformed checkpoints are refused naming the file and the tensor or field: safetensors headers checked as
the reference library checks them, integer weights, fair-esm configs, shard indexes that point outside the
checkpoint; and save_fair_esm leaves no stale contact-regression file behind."""

from __future__ import annotations

import argparse
import json
import os
import struct

import numpy as np
import pytest

from esm_dual.io.base import CheckpointError
from esm_dual.io.fair_esm import read_fair_esm, save_fair_esm
from esm_dual.io.hub import load_checkpoint, save_checkpoint
from tests.conftest import tiny_config
from tests.utils import random_hub_tensors, write_hub_checkpoint

torch = pytest.importorskip("torch")

NAME = "esm.encoder.layer.0.LayerNorm.bias"


@pytest.fixture
def hub(tmp_path):
    d = tmp_path / "hub"
    write_hub_checkpoint(str(d), tiny_config("esm2"))
    path = d / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return d, path, json.loads(data[8:8 + n]), data[8 + n:]


def _write(path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _refused(d, path, *fragments) -> None:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(d))
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize("edit,fragment", [
    (lambda e: {**e, "data_offsets": [None, 5]}, "data_offsets must be two non-negative integers"),
    (lambda e: {**e, "data_offsets": [e["data_offsets"][0]]}, "data_offsets must be two non-negative integers"),
    (lambda e: {**e, "data_offsets": [True, 5]}, "data_offsets must be two non-negative integers"),
    (lambda e: {**e, "shape": [18.5]}, "shape must be a list of non-negative integers, got [18.5]"),
    (lambda e: {**e, "shape": [18.0]}, "shape must be a list of non-negative integers"),
    (lambda e: {**e, "shape": "18"}, "shape must be a list of non-negative integers"),
    (lambda e: {**e, "dtype": 5}, "unsupported dtype 5"),
    (lambda e: [1, 2], "expected an object with dtype, shape and data_offsets"),
    (lambda e: {"dtype": e["dtype"], "shape": e["shape"]}, "no data_offsets"),
])
def test_malformed_header_entry_is_named(hub, edit, fragment):
    d, path, header, body = hub
    _write(path, {**header, NAME: edit(header[NAME])}, body)
    _refused(d, path, NAME, fragment)


def test_overlapping_data_offsets_are_refused(hub):
    d, path, header, body = hub
    names = [k for k in header if k != "__metadata__" and header[k]["shape"] == [18] and k != NAME]
    other = names[0]
    bad = {**header, NAME: {**header[NAME], "data_offsets": header[other]["data_offsets"]}}
    _write(path, bad, body)
    _refused(d, path, "overlaps")


def test_gap_and_trailing_bytes_are_refused(hub):
    d, path, header, body = hub
    _write(path, header, body + b"\0" * 8)
    _refused(d, path, "the tensors cover")
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    b, e = header[last]["data_offsets"]
    _write(path, {**header, last: {**header[last], "data_offsets": [b + 4, e + 4]}}, body + b"\0" * 4)
    _refused(d, path, last, "leaves a gap")


def test_metadata_must_map_strings_to_strings(hub):
    d, path, header, body = hub
    _write(path, {**header, "__metadata__": {"format": 1}}, body)
    _refused(d, path, "__metadata__")


def test_integer_weight_is_refused_naming_the_tensor(tmp_path):
    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    name = "esm.encoder.layer.0.attention.self.query.weight"
    tensors[name] = tensors[name].astype(np.int32)
    save_checkpoint(str(tmp_path), cfg, tensors)
    with pytest.raises(CheckpointError, match=rf"{name}: stored as int32, but ESM weights are floating point"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("absolute", [False, True])
def test_shard_index_pointing_outside_the_directory_is_refused(tmp_path, absolute):
    cfg = tiny_config("esm2")
    tensors = random_hub_tensors(cfg)
    other = tmp_path / "other"
    save_checkpoint(str(other), cfg, tensors)  # a complete, loadable checkpoint outside
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(cfg.to_json_string())
    target = str(other / "model.safetensors") if absolute else "../other/model.safetensors"
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, target)}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="leaves the checkpoint directory") as e:
        load_checkpoint(str(d))
    assert str(d / "model.safetensors.index.json") in str(e.value) and target in str(e.value)


@pytest.mark.parametrize("field,value", [("encoder_attention_heads", "x"), ("encoder_layers", None),
                                         ("encoder_embed_dim", 17.5), ("encoder_layers", -1)])
def test_fair_esm_config_value_that_is_not_a_number_is_named(tmp_path, field, value):
    cfg = tiny_config("esm2", intermediate_size=72)
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, random_hub_tensors(cfg))
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
    setattr(data["cfg"]["model"], field, value)
    torch.save(data, str(path))
    with pytest.raises(CheckpointError, match=rf"{field}.*must be a positive integer, got {value!r}") as e:
        read_fair_esm(str(path))
    assert str(path) in str(e.value)


def test_fair_esm_config_with_indivisible_heads_is_named(tmp_path):
    cfg = tiny_config("esm2", intermediate_size=72)
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, random_hub_tensors(cfg))
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
    data["cfg"]["model"].encoder_attention_heads = 4
    torch.save(data, str(path))
    with pytest.raises(CheckpointError, match="num_attention_heads") as e:
        read_fair_esm(str(path))
    assert str(path) in str(e.value)


def test_save_fair_esm_without_contact_head_removes_a_stale_one(tmp_path):
    cfg = tiny_config("esm2", intermediate_size=72)
    tensors = random_hub_tensors(cfg)
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, tensors)
    assert (tmp_path / "esm2_t3_tiny-contact-regression.pt").exists()
    with pytest.warns(UserWarning, match="contact-regression"):
        save_fair_esm(str(path), cfg, {k: v for k, v in tensors.items() if "contact_head" not in k})
    assert sorted(os.listdir(tmp_path)) == ["esm2_t3_tiny.pt"]
    assert not any("contact_head" in k for k in read_fair_esm(str(path)).tensors)


def test_invalid_config_json_names_the_file_once(tmp_path):
    d = tmp_path / "m"
    write_hub_checkpoint(str(d), tiny_config("esm2"))
    (d / "config.json").write_text('{"hidden_size": 18,')
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(d))
    msg = str(e.value)
    assert "not valid JSON" in msg and msg.count("config.json") == 1, msg
