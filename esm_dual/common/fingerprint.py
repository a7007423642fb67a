"""A cheap fingerprint of a checkpoint's weight files, so that resumed runs notice new weights at an old path.

``weights_fingerprint(location)`` hashes, for every weight and config file of a checkpoint (a hub-layout
directory, a single file and fair-esm's ``-contact-regression.pt`` beside it): its name, its size and its
bytes: all of them for files up to 8 MiB, else 64 blocks of 64 KiB spread evenly over the file (the first
and last included). Retrained or re-converted weights change bytes everywhere, so a sample tells them apart
while a multi-GB file costs a few MB of reading. Not a security check: a file forged to keep the sampled
blocks would pass.
"""

from __future__ import annotations

import hashlib
import os

_WHOLE = 8 << 20
_BLOCK = 64 << 10
_BLOCKS = 64
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".keras", ".json", ".npz")


def file_fingerprint(path: str, h=None):
    """Feed one file (size + whole content or sampled blocks) into ``h`` (a hashlib object); returns ``h``."""
    h = h or hashlib.sha256()
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            step = (size - _BLOCK) / (_BLOCKS - 1)
            for i in range(_BLOCKS):
                f.seek(int(i * step))
                h.update(f.read(_BLOCK))
    return h


def _files(location: str) -> list[str]:
    if os.path.isdir(location):
        out = []
        for root, dirs, names in os.walk(location):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            out += [os.path.join(root, n) for n in sorted(names) if n.endswith(_SUFFIXES) and not n.startswith(".")]
        return out
    files = [location]
    stem, ext = os.path.splitext(location)
    regression = stem + "-contact-regression" + ext
    if os.path.isfile(regression):
        files.append(regression)
    return files


def weights_fingerprint(location: str | os.PathLike) -> str | None:
    """Hex digest over the checkpoint's files (see the module docstring); None when ``location`` is not a
    local file or directory (a hub id before download: the hub's revision pins it)."""
    location = os.fspath(location)
    if not os.path.exists(location):
        return None
    h = hashlib.sha256()
    for path in _files(location):
        h.update(os.path.relpath(path, location if os.path.isdir(location) else os.path.dirname(path)).encode())
        file_fingerprint(path, h)
    return h.hexdigest()[:32]


__all__ = ["file_fingerprint", "weights_fingerprint"]
