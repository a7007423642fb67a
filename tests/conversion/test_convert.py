"""esm_dual.convert: every source and target on tiny checkpoints, bit-exact round trips, --verify, dtypes,
streaming shards, and bad input that fails clearly and changes nothing."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

import esm_dual
import esm_dual.conversion as conv
from esm_dual.io.base import CheckpointError
from esm_dual.io.fair_esm import read_fair_esm, save_fair_esm
from esm_dual.io.hub import load_checkpoint, save_checkpoint
from tests.conversion.helpers import assert_same_tensors, hub_tensors, leftovers, make_hub

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

STEM = {"esm2": "esm2_t3_tiny", "esm1b": "esm1b_t3_tiny"}


@pytest.fixture(scope="module")
def hubs(tmp_path_factory):
    """Tiny MLM hub checkpoints, ESM-2 and ESM-1b."""
    root = tmp_path_factory.mktemp("hubs")
    out = {}
    for flavour in ("esm2", "esm1b"):
        d = str(root / f"{flavour}_mlm")
        make_hub(d, flavour, "mlm")
        out[flavour] = d
    return out


def _dst(tmp_path, flavour, to):
    return {"hf": str(tmp_path / "out_hf"), "keras": str(tmp_path / "out.keras"),
            "tf-h5": str(tmp_path / "out_tf"), "fair-esm": str(tmp_path / f"{STEM[flavour]}.pt")}[to]


# ------------------------------------------------------------------------------------------------
# every target, and back: bit-exact, verified
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["hf", "keras", "tf-h5", "fair-esm"])
@pytest.mark.parametrize("flavour", ["esm2", "esm1b"])
def test_round_trip_every_target(hubs, tmp_path, flavour, to):
    src = hubs[flavour]
    dst = _dst(tmp_path, flavour, to)
    report = esm_dual.convert(src, dst, to=to, verify=True)
    assert os.path.exists(dst) and report.target_format == to
    cross = to in ("keras", "tf-h5")
    assert set(report.verify) == {"logits", "last_hidden_state", "contacts"}
    assert report.tolerance == (1e-4 if cross else 1e-5)
    assert max(report.verify.values()) <= report.tolerance
    # Only the unused ESM-2 position table may be left out (fair-esm and the Keras model have no place for it).
    expect_dropped = ["esm.embeddings.position_embeddings.weight"] if flavour == "esm2" and to in (
        "keras", "fair-esm") else []
    assert report.dropped == expect_dropped
    back = str(tmp_path / "back")
    report2 = esm_dual.convert(dst, back, to="hf", verify=True)
    assert report2.source_format == to
    assert max(report2.verify.values()) <= report2.tolerance
    assert_same_tensors(hub_tensors(src), hub_tensors(back), skip=report.dropped)
    assert leftovers(str(tmp_path)) == []


@pytest.mark.parametrize("head", ["base", "seq", "tok"])
def test_other_heads_through_tf_h5_and_keras(tmp_path, head):
    src = str(tmp_path / "src")
    make_hub(src, "esm1v", head)
    for to, dst in (("tf-h5", str(tmp_path / "tf")), ("keras", str(tmp_path / "m.keras"))):
        report = esm_dual.convert(src, dst, to=to, verify=True)
        assert ("logits" in report.verify) == (head != "base")
        assert "contacts" in report.verify
        back = str(tmp_path / f"back_{to}")
        esm_dual.convert(dst, back, to="hf")
        assert_same_tensors(hub_tensors(src), hub_tensors(back), skip=report.dropped)
        assert load_checkpoint(back).config.architectures == load_checkpoint(src).config.architectures


def test_fair_esm_target_refuses_non_mlm(tmp_path):
    src = str(tmp_path / "seq")
    make_hub(src, "esm2", "seq")
    with pytest.raises(CheckpointError, match="masked-LM"):
        esm_dual.convert(src, str(tmp_path / "esm2_x.pt"), to="fair-esm")
    assert not os.path.exists(tmp_path / "esm2_x.pt")


# ------------------------------------------------------------------------------------------------
# sources: pytorch_model.bin, sharded safetensors, fair-esm with contact regression
# ------------------------------------------------------------------------------------------------


def test_bin_and_sharded_sources(tmp_path):
    src = str(tmp_path / "src")
    tensors = make_hub(src, "esm2", "mlm")
    config = load_checkpoint(src).config
    # pytorch_model.bin
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text(config.to_json_string())
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, str(bin_dir / "pytorch_model.bin"))
    # sharded safetensors written by save_checkpoint
    sharded = str(tmp_path / "sharded")
    save_checkpoint(sharded, config, tensors, max_shard_size=30_000)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    # sharded pytorch_model.bin + index
    bin_sharded = tmp_path / "bin_sharded"
    bin_sharded.mkdir()
    (bin_sharded / "config.json").write_text(config.to_json_string())
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        fname = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: torch.from_numpy(tensors[k].copy()) for k in part}, str(bin_sharded / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (bin_sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for i, s in enumerate((str(bin_dir), sharded, str(bin_sharded))):
        assert conv.detect_format(s) == "hf"
        out = str(tmp_path / f"out{i}")
        r = esm_dual.convert(s, out, to="hf", verify=True)
        assert r.verify["logits"] == 0.0
        assert_same_tensors(tensors, hub_tensors(out))


def test_hf_writer_matches_save_checkpoint_bytes(tmp_path):
    """Streaming writer: the same bytes as save_checkpoint for one file, HF's index format for shards."""
    src = str(tmp_path / "src")
    tensors = make_hub(src, "esm1b", "mlm")
    out = str(tmp_path / "out")
    esm_dual.convert(src, out, to="hf", max_shard_size=None)
    with open(os.path.join(src, "model.safetensors"), "rb") as a, open(os.path.join(out, "model.safetensors"),
                                                                       "rb") as b:
        assert a.read() == b.read()
    sharded = str(tmp_path / "sharded")
    esm_dual.convert(src, sharded, to="hf", max_shard_size="20KB")
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    for f in files:
        if os.path.getsize(os.path.join(sharded, f)) > 20_000 + 4096:  # only a single oversized tensor may exceed
            from safetensors import safe_open

            with safe_open(os.path.join(sharded, f), "np") as h:
                assert len(list(h.keys())) == 1
    assert_same_tensors(tensors, hub_tensors(sharded))
    # transformers reads the sharded output
    from tests.utils import hf_model

    model = hf_model(sharded, "mlm")
    assert model.esm.encoder.layer[0].attention.self.query.weight.shape == (18, 18)


def test_fair_esm_source_with_contact_regression(tmp_path):
    src = str(tmp_path / "src")
    tensors = make_hub(src, "esm2", "mlm")
    ck = load_checkpoint(src)
    pt = str(tmp_path / "esm2_t3_src.pt")
    save_fair_esm(pt, ck.config, ck.tensors)
    assert os.path.exists(str(tmp_path / "esm2_t3_src-contact-regression.pt"))
    assert conv.detect_format(pt) == "fair-esm"
    hub = str(tmp_path / "hub")
    r = esm_dual.convert(pt, hub, to="hf", verify=True)
    assert "contacts" in r.verify
    skip = ["esm.embeddings.position_embeddings.weight"]
    assert_same_tensors(tensors, hub_tensors(hub), skip=skip)
    # our fair-esm writer produces what save_fair_esm produces
    ours = str(tmp_path / "esm2_t3_ours.pt")
    esm_dual.convert(hub, ours, to="fair-esm")
    a = torch.load(pt, weights_only=False)
    b = torch.load(ours, weights_only=False)
    assert vars(a["cfg"]["model"]) == vars(b["cfg"]["model"])
    assert list(a["model"]) == list(b["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert b["model"]["encoder.lm_head.weight"] is b["model"]["encoder.sentence_encoder.embed_tokens.weight"]
    ra = torch.load(str(tmp_path / "esm2_t3_src-contact-regression.pt"), weights_only=False)["model"]
    rb = torch.load(str(tmp_path / "esm2_t3_ours-contact-regression.pt"), weights_only=False)["model"]
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    assert_same_tensors(read_fair_esm(pt).tensors, read_fair_esm(ours).tensors)


def test_fair_esm_output_loads_in_fair_esm(hubs, tmp_path):
    esm = pytest.importorskip("esm")
    from esm_dual.conversion import verification_batch
    from esm_dual.pt import EsmForMaskedLM

    for flavour in ("esm2", "esm1b"):
        dst = str(tmp_path / f"{STEM[flavour]}.pt")
        esm_dual.convert(hubs[flavour], dst, to="fair-esm")
        with torch.serialization.safe_globals([argparse.Namespace]):
            model, _ = esm.pretrained.load_model_and_alphabet_local(dst)
        model.eval()
        ids, _ = verification_batch()
        ids = torch.from_numpy(ids)
        ours = EsmForMaskedLM.from_pretrained(hubs[flavour]).eval()
        with torch.no_grad():
            ref = model(ids, return_contacts=True)
            got = ours(ids)
        real = ids != 1
        np.testing.assert_allclose(got.logits[real].numpy(), ref["logits"][real].numpy(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------


def test_dtype_only_when_asked(hubs, tmp_path):
    src = hubs["esm2"]
    bf = str(tmp_path / "bf16")
    r = esm_dual.convert(src, bf, to="hf", dtype="bf16", verify=True)
    assert r.dtype == "bfloat16" and max(r.verify.values()) <= 1e-5  # reference: source rounded to bf16
    t = hub_tensors(bf)
    for k, v in t.items():
        assert v.dtype == (np.float32 if k.endswith("inv_freq") else BF16), k
    src_t = hub_tensors(src)
    for k in src_t:
        if not k.endswith("inv_freq"):
            assert t[k].tobytes() == src_t[k].astype(BF16).tobytes()
    # bf16 stays bf16, bit-exact, in hub and Keras round trips
    again = str(tmp_path / "again")
    esm_dual.convert(bf, again, to="hf")
    assert_same_tensors(t, hub_tensors(again))
    # tf_model.h5 cannot hold bf16: refused unless a dtype is asked for
    with pytest.raises(CheckpointError, match="bfloat16"):
        esm_dual.convert(bf, str(tmp_path / "tf"), to="tf-h5")
    assert not os.path.exists(tmp_path / "tf")
    r = esm_dual.convert(bf, str(tmp_path / "tf16"), to="tf-h5", dtype="float16", verify=True)
    assert max(r.verify.values()) <= 1e-4
    back = hub_tensors(esm_dual.convert(str(tmp_path / "tf16"), str(tmp_path / "tf16_back"), to="hf").dst)
    assert back["esm.encoder.layer.0.attention.self.query.weight"].dtype == np.float16


def test_bf16_keras_round_trip(hubs, tmp_path):
    bf = str(tmp_path / "bf16")
    esm_dual.convert(hubs["esm1b"], bf, to="hf", dtype="bfloat16")
    r = esm_dual.convert(bf, str(tmp_path / "m.keras"), to="keras", verify=True)
    assert max(r.verify.values()) <= 1e-4
    esm_dual.convert(str(tmp_path / "m.keras"), str(tmp_path / "back"), to="hf")
    assert_same_tensors(hub_tensors(bf), hub_tensors(str(tmp_path / "back")))


# ------------------------------------------------------------------------------------------------
# Keras sources: .weights.h5 (+ config), and the callable module
# ------------------------------------------------------------------------------------------------


def test_keras_weights_source_needs_config(hubs, tmp_path):
    from esm_dual.tf import TFEsmForMaskedLM

    model = TFEsmForMaskedLM.from_pretrained(hubs["esm2"])
    w = str(tmp_path / "m.weights.h5")
    model.save_weights(w)
    assert conv.detect_format(w) == "keras-weights"
    with pytest.raises(CheckpointError, match="--config"):
        esm_dual.convert(w, str(tmp_path / "x"), to="hf")
    out = str(tmp_path / "out")
    r = esm_dual.convert(w, out, to="hf", config=os.path.join(hubs["esm2"], "config.json"), verify=True)
    assert r.source_format == "keras-weights" and max(r.verify.values()) <= 1e-4
    assert_same_tensors(hub_tensors(hubs["esm2"]), hub_tensors(out),
                        skip=["esm.embeddings.position_embeddings.weight"])


def test_module_is_callable_and_api():
    assert callable(esm_dual.convert)
    assert esm_dual.convert is conv.convert
    assert set(conv.TARGETS) == {"hf", "keras", "tf-h5", "fair-esm"}


# ------------------------------------------------------------------------------------------------
# --verify failure and failures mid-way: nothing written
# ------------------------------------------------------------------------------------------------


def _perturb(monkeypatch, name_part: str, delta: float = 1e-2):
    orig = conv._get_hook

    def hook(source):
        get = orig(source)

        def patched(name):
            a = get(name)
            return a + np.asarray(delta, a.dtype) if name_part in name else a

        return patched

    monkeypatch.setattr(conv, "_get_hook", hook)


@pytest.mark.parametrize("to", ["hf", "tf-h5"])
def test_verify_forced_failure_writes_nothing(hubs, tmp_path, monkeypatch, to):
    _perturb(monkeypatch, "layer.1.intermediate.dense.weight")
    dst = str(tmp_path / "out")
    with pytest.raises(conv.VerificationError, match="logits max"):
        esm_dual.convert(hubs["esm2"], dst, to=to, verify=True)
    assert not os.path.exists(dst) and leftovers(str(tmp_path)) == []
    # without --verify the same (wrong) conversion goes through: verification is what caught it
    esm_dual.convert(hubs["esm2"], dst, to=to)
    assert os.path.exists(dst)


def test_verify_tiny_perturbation_within_tolerance_passes(hubs, tmp_path, monkeypatch):
    _perturb(monkeypatch, "lm_head.bias", 1e-7)
    r = esm_dual.convert(hubs["esm2"], str(tmp_path / "o"), to="hf", verify=True)
    assert 0 < r.verify["logits"] <= 1e-5


def test_failure_mid_write_leaves_nothing(hubs, tmp_path, monkeypatch):
    orig = conv._get_hook
    calls = []

    def hook(source):
        get = orig(source)

        def failing(name):
            calls.append(name)
            if len(calls) == 10:
                raise OSError("disk on fire")
            return get(name)

        return failing

    monkeypatch.setattr(conv, "_get_hook", hook)
    for to, dst in (("hf", tmp_path / "o"), ("fair-esm", tmp_path / "esm2_x.pt"), ("tf-h5", tmp_path / "t")):
        calls.clear()
        with pytest.raises(OSError, match="disk on fire"):
            esm_dual.convert(hubs["esm2"], str(dst), to=to)
        assert not os.path.exists(dst)
    assert not os.path.exists(tmp_path / "esm2_x-contact-regression.pt")
    assert leftovers(str(tmp_path)) == []


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_destination_exists(hubs, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        esm_dual.convert(hubs["esm2"], str(dst), to="hf")
    assert os.listdir(dst) == ["keep.txt"]
    with pytest.raises(CheckpointError, match=r"keep\.txt"):  # overwrite=True replaces a checkpoint only
        esm_dual.convert(hubs["esm2"], str(dst), to="hf", overwrite=True)
    assert os.listdir(dst) == ["keep.txt"]
    esm_dual.convert(hubs["esm2"], str(dst), to="hf", overwrite="dir")
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    assert leftovers(str(tmp_path)) == []
    # fair-esm: the contact-regression file beside it counts too
    pt = tmp_path / "esm2_t.pt"
    esm_dual.convert(hubs["esm2"], str(pt), to="fair-esm")
    os.remove(pt)
    with pytest.raises(CheckpointError, match="contact-regression.pt: already exists"):
        esm_dual.convert(hubs["esm2"], str(pt), to="fair-esm")
    esm_dual.convert(hubs["esm2"], str(pt), to="fair-esm", overwrite=True)
    # never over the source itself
    with pytest.raises(CheckpointError, match="holds the source"):
        esm_dual.convert(os.path.join(str(dst), "model.safetensors"), str(dst), to="hf", overwrite=True)
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]


def _hub_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_and_corrupt_files(hubs, tmp_path):
    bad = _hub_copy(hubs["esm2"], str(tmp_path / "trunc"))
    f = os.path.join(bad, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as h:
        h.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        esm_dual.convert(bad, str(tmp_path / "o1"), to="hf")
    corrupt = _hub_copy(hubs["esm2"], str(tmp_path / "corrupt"))
    with open(os.path.join(corrupt, "model.safetensors"), "r+b") as h:
        h.seek(8)
        h.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        esm_dual.convert(corrupt, str(tmp_path / "o2"), to="keras" if False else "hf")
    pt = tmp_path / "esm2_bad.pt"
    pt.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="esm2_bad.pt"):
        esm_dual.convert(str(pt), str(tmp_path / "o3"), to="hf")
    k = tmp_path / "bad.keras"
    k.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"bad\.keras: not a \.keras archive"):
        esm_dual.convert(str(k), str(tmp_path / "o4"), to="hf")
    for n in ("o1", "o2", "o3", "o4"):
        assert not os.path.exists(tmp_path / n)
    assert leftovers(str(tmp_path)) == []


def _edit_config(directory, **changes):
    p = os.path.join(directory, "config.json")
    with open(p) as f:
        d = json.load(f)
    d.update(changes)
    with open(p, "w") as f:
        json.dump(d, f)


def test_unknown_architecture_and_contradicting_shapes(hubs, tmp_path):
    arch = _hub_copy(hubs["esm2"], str(tmp_path / "arch"))
    _edit_config(arch, architectures=["EsmForProteinFolding"])
    with pytest.raises(CheckpointError, match="unknown architecture 'EsmForProteinFolding'.*ESMFold"):
        esm_dual.convert(arch, str(tmp_path / "o"), to="hf")
    shapes = _hub_copy(hubs["esm2"], str(tmp_path / "shapes"))
    _edit_config(shapes, intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.weight: expected shape \[40, 18\]"):
        esm_dual.convert(shapes, str(tmp_path / "o"), to="hf")
    layers = _hub_copy(hubs["esm2"], str(tmp_path / "layers"))
    _edit_config(layers, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match="layer 2 but the config has num_hidden_layers=2"):
        esm_dual.convert(layers, str(tmp_path / "o"), to="tf-h5")
    more = _hub_copy(hubs["esm2"], str(tmp_path / "more"))
    _edit_config(more, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"contact_head\.regression\.weight: expected shape \[1, 12\]"):
        esm_dual.convert(more, str(tmp_path / "o"), to="hf")
    ck = load_checkpoint(hubs["esm2"])
    del ck.tensors["esm.encoder.layer.2.intermediate.dense.weight"]
    save_checkpoint(str(tmp_path / "missing"), ck.config, ck.tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*layer\.2\.intermediate\.dense\.weight"):
        esm_dual.convert(str(tmp_path / "missing"), str(tmp_path / "o"), to="hf")
    assert not os.path.exists(tmp_path / "o")


def test_unknown_tensor(tmp_path):
    src = str(tmp_path / "src")
    tensors = make_hub(src, "esm2", "mlm")
    config = load_checkpoint(src).config
    tensors["esm.encoder.layer.0.attention.self.extra.weight"] = np.zeros((2, 2), np.float32)
    save_checkpoint(src, config, tensors)
    with pytest.raises(CheckpointError, match=r"not part of an ESM EsmForMaskedLM: .*self\.extra\.weight"):
        esm_dual.convert(src, str(tmp_path / "o"), to="hf")


def test_bad_targets(hubs, tmp_path):
    with pytest.raises(CheckpointError, match="unknown target layout 'onnx'"):
        esm_dual.convert(hubs["esm2"], str(tmp_path / "o"), to="onnx")
    with pytest.raises(CheckpointError, match="say which layout"):
        esm_dual.convert(hubs["esm2"], str(tmp_path / "o"))
    with pytest.raises(CheckpointError, match="stem of an ESM-2 file must start with 'esm2'"):
        esm_dual.convert(hubs["esm2"], str(tmp_path / "model.pt"))
    with pytest.raises(CheckpointError, match="must end in .keras"):
        esm_dual.convert(hubs["esm2"], str(tmp_path / "model.h5"), to="keras")
    with pytest.raises(CheckpointError, match="is not an existing file or directory"):
        esm_dual.convert(str(tmp_path / "nothing"), str(tmp_path / "o"), to="hf")
    assert sorted(os.listdir(tmp_path)) == []


def test_esm1b_nonzero_mask_row_refused_for_fair_esm(tmp_path):
    src = str(tmp_path / "src")
    tensors = make_hub(src, "esm1b", "mlm")
    config = load_checkpoint(src).config
    tensors["esm.embeddings.word_embeddings.weight"][32] = 0.5
    save_checkpoint(src, config, tensors)
    with pytest.raises(CheckpointError, match="<mask> row"):
        esm_dual.convert(src, str(tmp_path / "esm1b_x.pt"))
    assert not os.path.exists(tmp_path / "esm1b_x.pt")


def test_transformers5_saved_checkpoint(tmp_path):
    """transformers 5 writes one literal 'esm.encoder.layer.*...inv_freq' table and no position table."""
    transformers = pytest.importorskip("transformers")
    from esm_dual.common.config import EsmConfig
    from tests.conftest import TINY_CONFIGS

    cfg = {**TINY_CONFIGS["esm2"], "intermediate_size": 72}
    torch.manual_seed(0)
    model = transformers.EsmForMaskedLM(transformers.EsmConfig(**cfg))
    src = str(tmp_path / "hf5")
    model.save_pretrained(src)
    names = set(hub_tensors(src))
    assert "esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq" in names
    for to, dst in (("hf", tmp_path / "o"), ("tf-h5", tmp_path / "t"), ("fair-esm", tmp_path / "esm2_t.pt"),
                    ("keras", tmp_path / "m.keras")):
        r = esm_dual.convert(src, str(dst), to=to, verify=True)
        assert max(r.verify.values()) <= r.tolerance, (to, r.verify)
        assert any("gamma/beta" in n for n in r.notes)
    canonical = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
                 for k, v in hub_tensors(src).items()}
    assert len(canonical) == len(names) and any(k.endswith("LayerNorm.gamma") for k in names)
    assert_same_tensors(canonical, hub_tensors(str(tmp_path / "o")))
    back = hub_tensors(esm_dual.convert(str(tmp_path / "t"), str(tmp_path / "tb"), to="hf").dst)
    inv = hub_tensors(src)["esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq"]
    for i in range(cfg["num_hidden_layers"]):  # spread to every layer, values unchanged
        assert back[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"].tobytes() == inv.tobytes()
    assert EsmConfig.from_pretrained(str(tmp_path / "tb")).position_embedding_type == "rotary"


def test_keras_file_of_another_model_and_fair_esm_to_keras(tmp_path):
    import keras

    other = str(tmp_path / "other.keras")
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(other)
    with pytest.raises(CheckpointError, match="not an esm_dual TFEsm\\* model"):
        esm_dual.convert(other, str(tmp_path / "o"), to="hf")
    src = str(tmp_path / "src")
    make_hub(src, "esm1b", "mlm")
    ck = load_checkpoint(src)
    pt = str(tmp_path / "esm1b_t3.pt")
    save_fair_esm(pt, ck.config, ck.tensors)
    r = esm_dual.convert(pt, str(tmp_path / "m.keras"), verify=True)  # fair-esm (PyTorch) -> .keras (TF)
    assert r.source_format == "fair-esm" and r.tolerance == 1e-4 and max(r.verify.values()) <= 1e-4
