"""Peak memory of ``esm-dual convert`` on a synthetic sharded checkpoint of a few GB. Prints JSON.

Not part of the test run. Makes an ESM-2-shaped hub checkpoint (hidden 1280, ``--layers`` layers: 38
layers are ~3.0 GB of float32) in 1 GB safetensors shards under a temporary directory, then runs each
conversion in a fresh child process and reads the child's peak RSS (``ru_maxrss``):

* ``hub -> hub --dtype bfloat16`` (streamed: tensor by tensor into planned shards);
* ``hub -> fair-esm`` (a ``.pt`` file is one pickle: one copy of the weights is held);
* ``hub -> tf-h5`` (streamed: one HDF5 dataset per tensor);
* ``baseline``: the same child importing esm_dual.conversion + torch and reading the config only.

Everything it writes is deleted at the end (``--keep`` keeps it)::

    python benchmarks/convert_memory.py --layers 38
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, resource, sys, time
mode, src, dst = sys.argv[1:4]
import esm_dual.conversion as conv
import torch  # noqa: F401  (same imports in every mode)
t0 = time.time()
if mode == "hf-bf16":
    conv.convert(src, dst, to="hf", dtype="bfloat16", max_shard_size="1GB")
elif mode == "fair-esm":
    conv.convert(src, dst, to="fair-esm")
elif mode == "tf-h5":
    conv.convert(src, dst, to="tf-h5")
elif mode == "baseline":
    conv.open_source(src).close()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": time.time() - t0, "peak_rss_bytes": peak}))
"""


class _SyntheticSource:
    """A conversion Source-like object producing random float32 tensors on demand (one at a time)."""

    format = "hf"

    def __init__(self, config, seed: int = 0):
        from esm_dual.io.schema import expected_shape

        self.config, self.path = config, "synthetic"
        c = config
        names = ["esm.embeddings.word_embeddings.weight", "esm.encoder.emb_layer_norm_after.weight",
                 "esm.encoder.emb_layer_norm_after.bias", "lm_head.dense.weight", "lm_head.dense.bias",
                 "lm_head.layer_norm.weight", "lm_head.layer_norm.bias", "lm_head.bias",
                 "esm.contact_head.regression.weight", "esm.contact_head.regression.bias"]
        for i in range(c.num_hidden_layers):
            for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                      "attention.LayerNorm", "intermediate.dense", "output.dense", "LayerNorm"):
                names += [f"esm.encoder.layer.{i}.{m}.weight", f"esm.encoder.layer.{i}.{m}.bias"]
        self._shapes = {n: expected_shape(c, n) for n in names}
        self._rng = np.random.default_rng(seed)

    def names(self):
        return list(self._shapes)

    def spec(self, name):
        return self._shapes[name], np.dtype(np.float32)

    def get(self, name):
        a = self._rng.standard_normal(self._shapes[name], dtype=np.float32)
        a *= 0.02
        if name.endswith("embeddings.weight"):
            a[32] = 0.0
        return a


def make_checkpoint(directory: str, layers: int) -> int:
    from esm_dual.common.config import EsmConfig
    from esm_dual.conversion.writers import write_hf

    config = EsmConfig(vocab_size=33, hidden_size=1280, num_hidden_layers=layers, num_attention_heads=20,
                       intermediate_size=5120, max_position_embeddings=1026, position_embedding_type="rotary",
                       token_dropout=True, emb_layer_norm_before=False, layer_norm_eps=1e-5, pad_token_id=1,
                       mask_token_id=32, architectures=["EsmForMaskedLM"])
    src = _SyntheticSource(config)
    write_hf(directory, src, src.names(), src.get, None, "1GB")
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def run_child(mode: str, src: str, dst: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, src, dst], capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=38, help="encoder layers (38: ~3.0 GB float32)")
    p.add_argument("--dir", default=None, help="where to put the files (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="esm_dual_convert_memory_")
    os.makedirs(root, exist_ok=True)
    src = os.path.join(root, "src")
    try:
        t0 = time.time()
        size = make_checkpoint(src, a.layers)
        shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
        result = {"checkpoint_bytes": size, "shards": len(shards), "make_seconds": time.time() - t0,
                  "python": sys.version.split()[0], "cpus": os.cpu_count(), "runs": {}}
        for mode, dst in (("baseline", ""), ("hf-bf16", os.path.join(root, "out_bf16")),
                          ("fair-esm", os.path.join(root, "esm2_synthetic.pt")),
                          ("tf-h5", os.path.join(root, "out_tf_h5"))):
            r = run_child(mode, src, dst)
            r["peak_rss_over_checkpoint"] = r["peak_rss_bytes"] / size
            if dst and os.path.isdir(dst):
                r["output_bytes"] = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
            elif dst and os.path.isfile(dst):
                r["output_bytes"] = os.path.getsize(dst)
            result["runs"][mode] = r
            if dst and not a.keep:
                shutil.rmtree(dst, ignore_errors=True) if os.path.isdir(dst) else os.remove(dst)
        print(json.dumps(result, indent=2))
    finally:
        if not a.keep and a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
