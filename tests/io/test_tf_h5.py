"""HF legacy tf_model.h5 (transformers 4.x TF layout): the committed fixtures made by transformers 4.57 load and
reproduce its logits; our writer's files read back bit-exactly; names, chunked attributes, bad files."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

import esm_dual
from esm_dual.io.base import CheckpointError
from esm_dual.io.tf_h5 import (
    HDF5_OBJECT_HEADER_LIMIT,
    TFH5File,
    _read_attr_list,
    _write_attr_list,
    hub_to_tf_name,
    read_tf_h5,
    tf_to_hub_name,
    write_tf_h5,
)
from tests.conversion.helpers import FIXTURES, assert_same_tensors, hub_tensors, leftovers, make_hub

FIXTURE_NAMES = ("esm2_mlm", "esm1b_seq")


def _fixture(name):
    d = os.path.join(FIXTURES, name)
    ids = np.load(os.path.join(d, "input_ids.npy")).astype(np.int64)
    mask = np.load(os.path.join(d, "attention_mask.npy")).astype(np.int64)
    return d, ids, mask, np.load(os.path.join(d, "logits_pt.npy"))


def _real(logits, mask):
    return mask.astype(bool) if logits.ndim == 3 else np.ones(len(mask), bool)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_reproduces_transformers4_logits_pt(name):
    torch = pytest.importorskip("torch")
    import esm_dual.pt as ept

    d, ids, mask, ref = _fixture(name)
    config, tensors = read_tf_h5(d)
    assert "lm_head.decoder.weight" not in tensors  # the tied copy in the lm_head group is dropped
    model = getattr(ept, config.architectures[0])(config).eval()
    assert model.load_hub_tensors(tensors, d) == []
    with torch.no_grad():
        got = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = _real(ref, mask)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_in_tf_matches_logits_pt_and_logits_tf(name):
    import esm_dual.tf as etf

    d, ids, mask, ref = _fixture(name)
    config, tensors = read_tf_h5(d)
    model = getattr(etf, "TF" + config.architectures[0])(config)
    model.load_hub_tensors(tensors, d)
    got = np.asarray(model(ids.astype(np.int32), attention_mask=mask.astype(np.int32)).logits)
    real = _real(ref, mask)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)
    ref_tf = np.load(os.path.join(d, "logits_tf.npy"))  # transformers 4.57's TF model on the padded batch
    np.testing.assert_allclose(got[real], ref_tf[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_round_trip_is_tensor_exact(name, tmp_path):
    """tf_model.h5 -> hub -> tf_model.h5: every dataset and attribute list the same."""
    d, *_ = _fixture(name)
    hub = str(tmp_path / "hub")
    r = esm_dual.convert(d, hub, to="hf", verify=True)
    assert r.source_format == "tf-h5" and max(r.verify.values()) <= 1e-4
    out = str(tmp_path / "tf")
    esm_dual.convert(hub, out, to="tf-h5", verify=True)
    with h5py.File(os.path.join(d, "tf_model.h5")) as a, h5py.File(os.path.join(out, "tf_model.h5")) as b:
        assert list(_read_attr_list(a, "layer_names")) == list(_read_attr_list(b, "layer_names"))
        for layer in _read_attr_list(a, "layer_names"):
            wa, wb = _read_attr_list(a[layer], "weight_names"), _read_attr_list(b[layer], "weight_names")
            assert sorted(wa) == sorted(wb)
            for w in wa:
                x, y = a[layer][w][()], b[layer][w][()]
                assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), w
    with TFH5File(d) as a, TFH5File(out) as b:
        assert_same_tensors(dict(iter(a)), dict(iter(b)))


def test_names_generic_rule():
    cases = {
        "m/esm/encoder/layer_._11/attention/self/query/kernel:0": ("esm.encoder.layer.11.attention.self.query.weight",
                                                                   True),
        "m/esm/encoder/layer_._0/attention/LayerNorm/gamma:0": ("esm.encoder.layer.0.attention.LayerNorm.weight",
                                                                False),
        "m/esm/encoder/emb_layer_norm_after/beta:0": ("esm.encoder.emb_layer_norm_after.bias", False),
        "m/esm/embeddings/word_embeddings/embeddings:0": ("esm.embeddings.word_embeddings.weight", False),
        "m/esm/encoder/layer_._2/attention/self/rotary_embeddings/inv_freq:0":
            ("esm.encoder.layer.2.attention.self.rotary_embeddings.inv_freq", False),
        "m/lm_head/bias:0": ("lm_head.bias", False),
        "m/classifier/out_proj/kernel:0": ("classifier.out_proj.weight", True),
        "m/esm/contact_head/regression/kernel:0": ("esm.contact_head.regression.weight", True),
    }
    for tf_name, (hub, transposed) in cases.items():
        assert tf_to_hub_name(tf_name) == (hub, transposed)
        assert hub_to_tf_name(hub, "m") == (tf_name, transposed)


def test_chunked_attributes_and_synthesized_table(tmp_path):
    """Keras splits attributes above 64512 bytes into name0, name1, ... (ESM-2 15B needs it)."""
    p = str(tmp_path / "a.h5")
    names = [f"tf_esm_for_masked_lm/esm/encoder/layer_._{i}/attention/self/query/kernel:0" for i in range(1500)]
    with h5py.File(p, "w") as f:
        _write_attr_list(f, "weight_names", names)
        assert "weight_names" not in f.attrs and "weight_names1" in f.attrs
        assert all(f.attrs[k].nbytes <= HDF5_OBJECT_HEADER_LIMIT for k in f.attrs)
    with h5py.File(p, "r") as f:
        assert _read_attr_list(f, "weight_names") == names
    # a hub file without the unused ESM-2 position table: a zero table is written (transformers 4.x TF
    # has the variable) and listed, so reading back gives exactly what was written
    src = str(tmp_path / "src")
    tensors = make_hub(src, "esm2", "mlm")
    tensors.pop("esm.embeddings.position_embeddings.weight")
    from esm_dual.io.hub import load_checkpoint

    config = load_checkpoint(src).config
    h5 = str(tmp_path / "tf_model.h5")
    write_tf_h5(h5, config, tensors.items())
    with h5py.File(h5) as f:
        assert _read_attr_list(f, "esm_dual_synthesized") == ["esm.embeddings.position_embeddings.weight"]
        assert not f["esm/tf_esm_for_masked_lm/esm/embeddings/position_embeddings/embeddings:0"][()].any()
    _, back = read_tf_h5(h5, config)
    assert_same_tensors(tensors, back)


def test_token_classification_layers(tmp_path):
    src = str(tmp_path / "src")
    make_hub(src, "esm2", "tok")
    out = str(tmp_path / "tf")
    esm_dual.convert(src, out, to="tf-h5")
    with h5py.File(os.path.join(out, "tf_model.h5")) as f:
        assert _read_attr_list(f, "layer_names") == ["esm", "dropout", "classifier"]
        assert _read_attr_list(f["dropout"], "weight_names") == []
        assert "tf_esm_for_token_classification/classifier/kernel:0" in _read_attr_list(f["classifier"],
                                                                                          "weight_names")


def test_bad_h5_files(tmp_path):
    d = str(tmp_path / "trunc")
    shutil.copytree(os.path.join(FIXTURES, "esm2_mlm"), d)
    f = os.path.join(d, "tf_model.h5")
    with open(f, "r+b") as h:
        h.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError, match=r"trunc/tf_model\.h5: not a readable HDF5 file \(truncated"):
        esm_dual.convert(d, str(tmp_path / "o"), to="hf")
    with open(f, "wb") as h:
        h.write(b"this is not hdf5" * 10)
    with pytest.raises(CheckpointError, match=r"tf_model\.h5: not a readable HDF5 file \(not an HDF5 file"):
        esm_dual.convert(d, str(tmp_path / "o"), to="hf")
    with h5py.File(f, "w") as h:
        h.create_dataset("x", data=np.zeros(3))
    with pytest.raises(CheckpointError, match="no 'layer_names' attribute"):
        esm_dual.convert(d, str(tmp_path / "o"), to="hf")
    nocfg = str(tmp_path / "nocfg")
    shutil.copytree(os.path.join(FIXTURES, "esm1b_seq"), nocfg)
    os.remove(os.path.join(nocfg, "config.json"))
    with pytest.raises(CheckpointError, match="missing config.json"):
        esm_dual.convert(nocfg, str(tmp_path / "o"), to="hf")
    assert not os.path.exists(tmp_path / "o") and leftovers(str(tmp_path)) == []


def test_hub_to_tf_h5_round_trip_keeps_rotary_tables(tmp_path):
    """ESM-2's stored (fp16-rounded in real files) inv_freq tables survive: transformers 4.x TF stores them too."""
    src = str(tmp_path / "src")
    tensors = make_hub(src, "esm2", "mlm")
    from esm_dual.io.hub import load_checkpoint, save_checkpoint

    config = load_checkpoint(src).config
    for k in tensors:
        if k.endswith("inv_freq"):
            tensors[k] = tensors[k].astype(np.float16).astype(np.float32)
    save_checkpoint(src, config, tensors)
    out, back = str(tmp_path / "tf"), str(tmp_path / "back")
    esm_dual.convert(src, out, to="tf-h5", verify=True)
    esm_dual.convert(out, back, to="hf")
    assert_same_tensors(tensors, hub_tensors(back))


# ------------------------------------------------------------------------------------------------
# Bytes only from the file itself (HDF5 external storage, virtual datasets, external links)
# ------------------------------------------------------------------------------------------------

QUERY = "esm/tf_esm_for_masked_lm/esm/encoder/layer_._0/attention/self/query/kernel:0"


def _tf_h5_with(tmp_path, make_dataset) -> str:
    """A converted tf_model.h5 whose first query kernel is replaced by what ``make_dataset(f, path, shape, dtype)``
    creates; a "secret" file of the right size sits beside it."""
    src, d = str(tmp_path / "src"), str(tmp_path / "tf")
    make_hub(src, "esm2", "mlm")
    esm_dual.convert(src, d, to="tf-h5")
    h5 = os.path.join(d, "tf_model.h5")
    with h5py.File(h5, "a") as f:
        shape, dtype = f[QUERY].shape, f[QUERY].dtype
        secret = tmp_path / "secret.bin"
        secret.write_bytes(np.full(shape, 7.0, dtype).tobytes())
        del f[QUERY]
        make_dataset(f, QUERY, shape, dtype, str(secret))
    return d


def _external_storage(f, path, shape, dtype, secret):
    f.create_dataset(path, shape=shape, dtype=dtype, external=[(secret, 0, int(np.prod(shape)) * dtype.itemsize)])


def _virtual(f, path, shape, dtype, secret):
    other = secret + ".h5"
    with h5py.File(other, "w") as g:
        g["data"] = np.full(shape, 7.0, dtype)
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[:] = h5py.VirtualSource(other, "data", shape=shape)
    f.create_virtual_dataset(path, layout)


def _external_link(f, path, shape, dtype, secret):
    other = secret + ".h5"
    with h5py.File(other, "w") as g:
        g["data"] = np.full(shape, 7.0, dtype)
    f[path] = h5py.ExternalLink(other, "/data")


@pytest.mark.parametrize("make_dataset,what", [(_external_storage, "external storage"),
                                               (_virtual, "virtual dataset"),
                                               (_external_link, "external link")])
def test_weights_from_outside_the_file_are_refused(tmp_path, make_dataset, what):
    d = _tf_h5_with(tmp_path, make_dataset)
    with pytest.raises(CheckpointError, match=what) as e:
        TFH5File(d)
    assert QUERY in str(e.value) and "outside the file" in str(e.value)
    with pytest.raises(CheckpointError, match=what):
        esm_dual.convert(d, str(tmp_path / "out"), to="hf", verify=True)
    assert not os.path.exists(tmp_path / "out") and not leftovers(str(tmp_path))
