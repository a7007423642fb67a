"""``esm-dual convert SRC DST --to {hf,keras,tf-h5,fair-esm}``: convert a checkpoint between layouts.

SRC may be a hub-layout directory (safetensors, sharded, pytorch_model.bin), a fair-esm ``.pt``, a
transformers 4.x ``tf_model.h5`` (or its directory), a ``.keras`` file, a ``.weights.h5`` file (with
``--config``) or a keras-hub ESM preset directory. Nothing is written unless the whole conversion (and
``--verify``, when given) succeeds. Exit status: 0 done, 1 verification failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from ._common import PROG, add_model_argument, resolve_positionals

_DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("_positionals", nargs="*", metavar="SRC DST",
                        help="SRC: the checkpoint to read (directory or file; or give it as --model); DST: where to "
                        "write it (a directory for hf / tf-h5, a .keras or .pt file otherwise)")
    add_model_argument(parser, dest="src", help=argparse.SUPPRESS)
    parser.add_argument("--to", choices=("hf", "keras", "tf-h5", "fair-esm"), default=None,
                        help="destination layout (default: from DST's extension: .keras -> keras, .pt -> fair-esm)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="cast the floating tensors (default: keep the stored dtype, bit-exact)")
    parser.add_argument("--verify", action="store_true",
                        help="run source and destination on a fixed batch and compare their outputs before "
                        "putting DST in place (tolerance 1e-4 across frameworks, 1e-5 within one)")
    parser.add_argument("--tolerance", type=float, default=None, help="override the --verify tolerance")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--config", default=None,
                        help="config.json for a source that has none (a Keras .weights.h5 file)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="hf output: shard the safetensors above this size (default 5GB; 'none': one file)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print nothing but errors (the frameworks' log lines included)")


def run(args: argparse.Namespace) -> int:
    import esm_dual.convert as conv

    resolve_positionals(args, ("src", "dst"), "convert")
    def log(msg: str) -> None:
        if not args.quiet:
            print(f"{PROG}: {msg}", file=sys.stderr)

    shard = None if str(args.max_shard_size).lower() == "none" else args.max_shard_size
    try:
        report = conv.convert(args.src, args.dst, to=args.to, dtype=args.dtype, verify=args.verify,
                              overwrite=args.overwrite, config=args.config, max_shard_size=shard,
                              tolerance=args.tolerance, log=log)
    except conv.VerificationError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    for note in report.notes:
        log(f"note: {note}")
    if report.dropped:
        log(f"not in the {report.target_format} layout (known-benign): {', '.join(report.dropped)}")
    if not args.quiet:
        cast = f", cast to {report.dtype}" if report.dtype else ""
        print(f"wrote {report.dst} ({report.target_format}: {report.num_tensors} tensors, "
              f"{report.num_bytes / 1e6:.1f} MB{cast})")
    return 0
