"""``esm-dual convert SRC DST --to {hf,keras,tf-h5,fair-esm}``: convert a checkpoint between layouts.

SRC may be a hub-layout directory (safetensors, sharded, pytorch_model.bin), a fair-esm ``.pt``, a
transformers 4.x ``tf_model.h5`` (or its directory), a ``.keras`` file, a ``.weights.h5`` file (with
``--config``) or a keras-hub ESM preset directory. Nothing is written unless the whole conversion (and
``--verify``, when given) succeeds; staging directories that earlier failed runs left beside DST are removed.
``--overwrite`` replaces a DST that is a checkpoint (a file, or a directory holding only checkpoint files);
a directory that also holds other files is refused unless ``--overwrite-dir`` says to replace it whole. A
destination without room for the output is refused before anything is written, and a disk that fills up
during the write is one error line (nothing is left behind). Exit status: 0 done, 1 verification failed,
2 bad input.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from ._common import PROG, CliError, add_model_argument, resolve_positionals

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".keras", ".json")

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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is a checkpoint (a directory that holds other files is refused)")
    parser.add_argument("--overwrite-dir", action="store_true",
                        help="replace DST even when it is a directory holding files that are not part of a "
                        "checkpoint (they are deleted)")
    parser.add_argument("--config", default=None,
                        help="config.json for a source that has none (a Keras .weights.h5 file)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="hf output: shard the safetensors above this size (default 5GB; 'none': one file)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print nothing but errors (the frameworks' log lines included)")


def _source_bytes(src: str) -> int:
    if os.path.isfile(src):
        stem, ext = os.path.splitext(src)
        extra = stem + "-contact-regression" + ext
        return os.path.getsize(src) + (os.path.getsize(extra) if os.path.isfile(extra) else 0)
    if os.path.isdir(src):
        return sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src)
                   if n.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(src, n)))
    return 0


def _check_room(src: str, dst: str, dtype: str | None) -> None:
    """Refuse before writing when DST's file system has clearly no room for the output (about the source's size;
    twice that when casting, which may widen)."""
    parent = os.path.dirname(os.path.abspath(dst))
    try:
        st = os.statvfs(parent)
    except (OSError, AttributeError):
        return
    need = _source_bytes(src) * (2 if dtype else 1) + (1 << 20)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise CliError(f"{dst}: not enough free space on its file system ({free / 1e6:.1f} MB free, the output "
                       f"needs about {need / 1e6:.1f} MB); nothing was written")


def _disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        msg = str(e)
        if "No space left on device" in msg or "errno = 28" in msg or "Disk quota exceeded" in msg:
            return True
        # torch's zip writer on a short write: "[enforce fail ...] unexpected pos N vs M" or "file write failed"
        if isinstance(e, RuntimeError) and ("unexpected pos" in msg or "file write failed" in msg):
            return True
        e = e.__cause__ or e.__context__
    return False


def run(args: argparse.Namespace) -> int:
    import esm_dual.conversion as conv

    resolve_positionals(args, ("src", "dst"), "convert")
    dst = args.dst
    if args.overwrite and not args.overwrite_dir:
        try:
            conv.check_replaceable(dst)
        except conv.CheckpointError as e:
            raise CliError(str(e)) from None
    if os.path.exists(args.src):
        _check_room(args.src, dst, args.dtype)

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"{PROG}: {msg}", file=sys.stderr)

    shard = None if str(args.max_shard_size).lower() == "none" else args.max_shard_size
    try:
        report = conv.convert(args.src, args.dst, to=args.to, dtype=args.dtype, verify=args.verify,
                              overwrite="dir" if args.overwrite_dir else args.overwrite, config=args.config,
                              max_shard_size=shard, tolerance=args.tolerance, log=log)
    except conv.VerificationError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except Exception as e:
        if _disk_full(e):
            raise CliError(f"{args.dst}: the disk is full (no space left on device while writing the "
                           "checkpoint); nothing was written and the partial output was removed") from None
        raise
    for note in report.notes:
        log(f"note: {note}")
    if report.dropped:
        log(f"not in the {report.target_format} layout (known-benign): {', '.join(report.dropped)}")
    if not args.quiet:
        cast = f", cast to {report.dtype}" if report.dtype else ""
        print(f"wrote {report.dst} ({report.target_format}: {report.num_tensors} tensors, "
              f"{report.num_bytes / 1e6:.1f} MB{cast})")
    return 0
