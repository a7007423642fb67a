"""esm_dual.io.dtypes: casting rules, bfloat16 with and without ml_dtypes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from esm_dual.io.base import CheckpointError
from esm_dual.io.hub import (
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import tiny_config
from tests.utils import ROOT, random_hub_tensors, write_hub_checkpoint

ml_dtypes = pytest.importorskip("ml_dtypes")


BF16 = np.dtype(ml_dtypes.bfloat16)


def test_bfloat16_without_ml_dtypes_reads_exact_float32(tmp_path, monkeypatch):
    import esm_dual.io.safetensors as ckmod

    cfg = tiny_config("esm2")
    tensors = {k: v.astype(BF16) for k, v in random_hub_tensors(cfg).items()}
    save_checkpoint(str(tmp_path / "d"), cfg, tensors)
    monkeypatch.setattr(ckmod, "bfloat16", lambda: None)
    monkeypatch.setitem(ckmod._ST_NUMPY, "BF16", lambda: None)
    with pytest.warns(UserWarning, match="ml_dtypes is not installed"):
        ck = load_checkpoint(str(tmp_path / "d"))
    for k, v in tensors.items():
        assert ck.tensors[k].dtype == np.float32
        np.testing.assert_array_equal(ck.tensors[k], v.astype(np.float32), err_msg=k)


def test_dtype_cast(tmp_path):
    cfg = tiny_config("esm2")
    tensors = write_hub_checkpoint(str(tmp_path / "d"), cfg)
    for spec, want in (("float16", np.float16), ("bfloat16", BF16), (np.float16, np.float16)):
        ck = load_checkpoint(str(tmp_path / "d"), dtype=spec)
        for k, v in ck.tensors.items():
            if k.endswith("inv_freq"):  # stored values kept exactly
                assert v.dtype == np.float32
                np.testing.assert_array_equal(v, tensors[k])
            else:
                assert v.dtype == np.dtype(want), k
                np.testing.assert_array_equal(v, tensors[k].astype(want))
    for bad in ("int8", "float128x", np.int32):
        with pytest.raises(CheckpointError):
            load_checkpoint(str(tmp_path / "d"), dtype=bad)


# A torch-only install: ml_dtypes cannot be imported (it is a declared dependency, but nothing may break without
# it). The child saves a bf16 model and loads it back, and loads a bf16 file written with ml_dtypes (by the parent).
_NO_ML_DTYPES = textwrap.dedent("""
    import sys
    sys.modules["ml_dtypes"] = None  # `import ml_dtypes` raises ImportError, as on an install without it
    import warnings
    import torch
    from esm_dual.pt import EsmForMaskedLM
    from tests.conftest import tiny_config

    out, theirs, theirs_state = sys.argv[1:4]
    torch.manual_seed(0)
    model = EsmForMaskedLM(tiny_config("esm2")).to(torch.bfloat16)
    model.save_pretrained(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ml_dtypes is not installed: bfloat16 tensor ... read as float32"
        back = EsmForMaskedLM.from_pretrained(out, torch_dtype="auto")
        other = EsmForMaskedLM.from_pretrained(theirs, torch_dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16, back.dtype
    for a, b in ((model.state_dict(), back.state_dict()), (torch.load(theirs_state), other.state_dict())):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert "ml_dtypes" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
    print("ok")
""")


def test_torch_only_install_saves_and_loads_bfloat16(tmp_path):
    """Without ml_dtypes a bf16 model saves and loads back bit for bit, and a bf16 safetensors file loads."""
    torch = pytest.importorskip("torch")
    from esm_dual.pt import EsmForMaskedLM

    torch.manual_seed(1)
    theirs = EsmForMaskedLM(tiny_config("esm2")).to(torch.bfloat16)
    theirs.save_pretrained(str(tmp_path / "theirs"))  # with ml_dtypes: BF16 tensors in the file
    torch.save(theirs.state_dict(), str(tmp_path / "theirs.pt"))
    r = subprocess.run([sys.executable, "-c", _NO_ML_DTYPES, str(tmp_path / "ours"), str(tmp_path / "theirs"),
                        str(tmp_path / "theirs.pt")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_one_converter_pair_round_trips_every_dtype():
    torch = pytest.importorskip("torch")
    from esm_dual.io.dtypes import numpy_to_torch, torch_to_numpy

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        t = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7).to(dtype)
        a = torch_to_numpy(t)
        back = numpy_to_torch(a)
        assert back.dtype == dtype and torch.equal(back, t), dtype
    ro = np.arange(4, dtype=np.float32)
    ro.flags.writeable = False
    assert numpy_to_torch(ro).tolist() == [0.0, 1.0, 2.0, 3.0]  # a read-only array is copied, not shared
