"""esm_dual.io.torch_pickle: the allowlisted unpickler never runs code from a file, names what it refuses, reads
fairseq configs without omegaconf, and bounds its work by the file's size."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import pytest

from esm_dual.io.base import CheckpointError
from esm_dual.io.fair_esm import read_fair_esm, save_fair_esm
from esm_dual.io.hub import (
    load_checkpoint,
)
from tests.conftest import tiny_config
from tests.io.helpers import assert_same, fair_config
from tests.utils import random_hub_tensors

torch = pytest.importorskip("torch")


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


_FAKE_OMEGACONF = {
    "omegaconf/__init__.py": "",
    "omegaconf/base.py": """
        from dataclasses import dataclass, field
        from collections import defaultdict
        from typing import Any, Dict, Optional

        @dataclass
        class Metadata:
            ref_type: Any
            object_type: Any
            optional: bool
            key: Any
            flags: Optional[Dict[str, bool]] = None
            flags_root: bool = False

        @dataclass
        class ContainerMetadata(Metadata):
            resolver_cache: Dict[str, Any] = field(default_factory=lambda: defaultdict(dict))
            key_type: Any = None
            element_type: Any = None
    """,
    "omegaconf/nodes.py": """
        class AnyNode:
            def __init__(self, value, key, parent):
                from typing import Any
                from omegaconf.base import Metadata
                self.__dict__.update(_metadata=Metadata(Any, None, True, key, {}, False), _parent=parent,
                                     _val=value)
    """,
    "omegaconf/listconfig.py": """
        class ListConfig:
            def __init__(self, items, key, parent):
                from typing import Any
                from omegaconf.base import ContainerMetadata
                from omegaconf.dictconfig import _wrap
                self.__dict__.update(_metadata=ContainerMetadata(Any, list, True, key, {}, False, key_type=int,
                                                                 element_type=Any),
                                     _parent=parent, _content=[_wrap(v, i, self) for i, v in enumerate(items)])
    """,
    "omegaconf/dictconfig.py": """
        def _wrap(value, key, parent):
            from omegaconf.listconfig import ListConfig
            from omegaconf.nodes import AnyNode
            if isinstance(value, dict):
                return DictConfig(value, key, parent)
            if isinstance(value, list):
                return ListConfig(value, key, parent)
            return AnyNode(value, key, parent)

        class DictConfig:
            def __init__(self, content, key=None, parent=None):
                from typing import Any
                from omegaconf.base import ContainerMetadata
                self.__dict__.update(_metadata=ContainerMetadata(Any, dict, True, key, {}, False, key_type=Any,
                                                                 element_type=Any),
                                     _parent=parent, _content={k: _wrap(v, k, self) for k, v in content.items()})

            def __getstate__(self):
                return self.__dict__

            def __setstate__(self, d):
                self.__dict__.update(d)
    """,
}


@pytest.mark.parametrize("zipfile", [True, False])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "esm2_t3_evil.pt"
    torch.save({"cfg": {"model": _Evil(str(marker))}, "model": {}}, str(path),
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError) as e:
        read_fair_esm(str(path))
    msg = str(e.value)
    assert str(path) in msg and "refusing" in msg
    assert "system" in msg  # names the global (posix.system / nt.system)
    assert not marker.exists()

    # the same for pytorch_model.bin in a hub directory
    d = tmp_path / "hub"
    d.mkdir()
    tiny_config("esm2").save_pretrained(str(d))
    torch.save({"x": _Evil(str(marker))}, str(d / "pytorch_model.bin"), _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(str(d))
    assert not marker.exists()


def test_other_unlisted_globals_are_named(tmp_path):
    import collections

    path = tmp_path / "esm2_t3_x.pt"
    torch.save({"model": {}, "cfg": {"model": collections.Counter(a=1)}, "x": collections.deque([1])}, str(path))
    with pytest.raises(CheckpointError, match="collections.deque"):
        read_fair_esm(str(path))


def test_fairseq_omegaconf_cfg_without_omegaconf(tmp_path):
    """ESM-2 files may carry fairseq's cfg as an omegaconf DictConfig: read it with stand-ins, executing
    nothing and without omegaconf installed (the writer runs in a subprocess with a mimic package whose
    pickles name the same omegaconf classes)."""
    cfg = fair_config("esm2")
    tensors = random_hub_tensors(cfg)
    plain = tmp_path / "esm2_t3_plain.pt"
    save_fair_esm(str(plain), cfg, tensors)
    pkg = tmp_path / "fakepkg"
    for rel, src in _FAKE_OMEGACONF.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(src))
    target = tmp_path / "esm2_t3_omega.pt"
    code = textwrap.dedent(f"""
        import argparse, torch, numpy as np
        from omegaconf.dictconfig import DictConfig
        with torch.serialization.safe_globals([argparse.Namespace]):
            d = torch.load({str(plain)!r}, weights_only=True)
        model = vars(d["cfg"]["model"])
        d["cfg"] = DictConfig({{"model": model, "common": {{"seed": 1, "fp16": True, "lst": [1, 2.5, "a"]}}}})
        d["extra_state"] = {{"val_loss": np.float64(2.5)}}
        torch.save(d, {str(target)!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(pkg))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(target)))
    assert {"omegaconf.dictconfig.DictConfig", "omegaconf.nodes.AnyNode", "omegaconf.base.ContainerMetadata",
            "omegaconf.listconfig.ListConfig", "typing.Any", "collections.defaultdict"} <= names
    assert "omegaconf" not in sys.modules
    ck = read_fair_esm(str(target))
    ref = read_fair_esm(str(plain))
    assert ck.config == ref.config
    expected = {k: v for k, v in ref.tensors.items() if "contact_head" not in k}  # regression file not beside it
    assert_same(ck.tensors, expected)
    assert "omegaconf" not in sys.modules


def _shared_nest(depth: int, fanout: int) -> list:
    """``depth`` levels of lists, each holding ``fanout`` references to the one list below: a pickle stores each
    level once (a memo reference is two bytes), but copying every reference visits ``fanout ** depth`` leaves."""
    x: list = [0.5]
    for _ in range(depth):
        x = [x] * fanout
    return x


def test_shared_references_are_not_expanded(tmp_path):
    """A fair-esm file with a 7-level shared-reference nest (~100 bytes more) is read at once: each object is
    converted once and stays shared (copying per reference would visit 12**7 = 35 million lists)."""
    import time

    from esm_dual.io.torch_pickle import to_plain

    cfg = fair_config("esm2")
    path = tmp_path / "esm2_t3_tiny.pt"
    save_fair_esm(str(path), cfg, random_hub_tensors(cfg))
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(str(path), weights_only=True)
    plain_size = os.path.getsize(path)
    data["extra"] = {"nest": _shared_nest(7, 12)}
    torch.save(data, str(path))
    assert os.path.getsize(path) - plain_size < 2000  # a tiny file ...
    t0 = time.perf_counter()
    ck = read_fair_esm(str(path))  # ... read as fast as without the nest
    assert time.perf_counter() - t0 < 20
    assert ck.config.num_hidden_layers == cfg.num_hidden_layers
    nest = to_plain(_shared_nest(7, 12))
    level = nest
    for _ in range(7):  # one list per level, shared by every reference to it
        assert len(level) == 12 and all(x is level[0] for x in level)
        level = level[0]
    assert level == [0.5]


def test_reference_cycles_are_kept_not_followed():
    import collections

    from esm_dual.io.torch_pickle import to_plain

    a: list = [1]
    a.append(a)
    d = collections.OrderedDict(x=a)
    d["self"] = d
    out = to_plain(d)
    assert out["x"][1] is out["x"] and out["self"] is out
