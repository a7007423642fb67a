"""Streaming FASTA reader and writer (plain or gzip), with errors that name the file, record and line.

``read_fasta`` yields one ``FastaRecord(id, description, sequence)`` at a time and never reads the whole
file up front. ``id`` is the first whitespace-delimited word of the header, ``description`` the whole
header line without ``>``. Sequences may span several lines; whitespace inside them is removed;
blank lines and comment lines (starting with ``;`` or ``#``) are skipped anywhere; gzip files
(detected by their magic bytes, whatever the name) are read transparently. Lines end at LF, CRLF or a lone
CR (old Mac files), mixed in one file too; a UTF-8 byte-order mark is dropped; leading and trailing
whitespace of a line, non-breaking spaces included, is ignored. Files, gzip files and text or binary file
objects are all split the same way.
Refused with ``FastaError``: text other than comments before the first header, an empty header, a header
with a NUL or other control character, a record without residues, and a repeated id.

``count_fasta`` counts by running this same reader (with the same checks), so a count and a read of one
file always agree.
"""

from __future__ import annotations

import gzip
import os
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from typing import IO, Any, NamedTuple

_GZIP_MAGIC = b"\x1f\x8b"
_COMMENT = (";", "#")
_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


class FastaError(ValueError):
    """Malformed FASTA input; the message names the file, the line number and, where known, the record."""


class FastaRecord(NamedTuple):
    id: str
    description: str
    sequence: str


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _open_text(path: str) -> IO[str]:
    # newline="": no translation; _lines splits at every convention itself, as for file objects
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _source_name(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    name = getattr(src, "name", None)
    return name if isinstance(name, str) else "<stream>"


def _lines(fh: Iterable[Any]) -> Iterator[str]:
    """The lines of a text or binary source, split at LF, CRLF and lone CR alike, without a leading BOM.

    Sources yield pieces that end at a line end (files, StringIO, BytesIO split at LF or at any convention):
    a CR and its LF are never in two pieces, so each piece is split on its own."""
    first = True
    for piece in fh:
        if isinstance(piece, bytes):
            piece = piece.decode("utf-8")
        if first:
            piece = piece.removeprefix(_BOM)
            first = False
        parts = _LINE_END.split(piece)
        if parts and parts[-1] == "":
            parts.pop()  # the piece ended with its line end
        yield from parts


def _unreadable(name: str, e: BaseException) -> FastaError:
    """A decoding or decompression failure as a FastaError naming the file. (Text is decoded in blocks, so
    the line is not known.)"""
    if isinstance(e, UnicodeDecodeError):
        return FastaError(f"{name}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}); is this a FASTA file?")
    return FastaError(f"{name}: the gzip data is damaged or cut short ({type(e).__name__}: {e})")


_READ_ERRORS = (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error)


def _check_path(path: str) -> None:
    if os.path.isdir(path):
        raise FastaError(f"{path} is a directory, not a FASTA file")


def read_fasta(
    path_or_file: str | os.PathLike | IO[str] | IO[bytes],
    check_duplicates: bool = True,
    allow_empty: bool = False,
) -> Iterator[FastaRecord]:
    """Yield the records of a FASTA file (path, ``.gz`` path, or an open text/binary file object).

    ``check_duplicates=False`` lets repeated ids through; ``allow_empty=True`` yields records
    without residues instead of raising.
    """
    name = _source_name(path_or_file)
    if isinstance(path_or_file, (str, os.PathLike)):
        _check_path(os.fspath(path_or_file))
        fh: Any = _open_text(os.fspath(path_or_file))
        owned = True
    else:
        fh, owned = path_or_file, False
    try:
        yield from _parse(_lines(fh), name, check_duplicates, allow_empty)
    except _READ_ERRORS as e:
        raise _unreadable(name, e) from None
    finally:
        if owned:
            fh.close()


def _parse(lines: Iterable[str], name: str, check_duplicates: bool, allow_empty: bool
           ) -> Iterator[FastaRecord]:
    seen: dict[str, int] = {}
    header: str | None = None
    header_line = 0
    chunks: list[str] = []

    def finish() -> FastaRecord:
        seq = "".join(chunks)
        rec_id = header.split(maxsplit=1)[0]
        if not seq and not allow_empty:
            raise FastaError(f"{name}:{header_line}: record {rec_id!r} has an empty sequence")
        return FastaRecord(rec_id, header, seq)

    lineno = 0
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith(_COMMENT):
            continue
        if line.startswith(">"):
            if header is not None:
                yield finish()
            header = line[1:].strip()
            header_line = lineno
            chunks = []
            if not header:
                raise FastaError(f"{name}:{lineno}: empty header (a record needs an id after '>')")
            bad = next((c for c in header if c != "\t" and unicodedata.category(c) == "Cc"), None)
            if bad is not None:
                what = "a NUL character" if bad == "\x00" else f"the control character {bad!r}"
                shown = header if len(header) <= 40 else header[:37] + "..."
                raise FastaError(f"{name}:{lineno}: the header {shown!r} contains {what}; "
                                 "is this a text FASTA file?")
            rec_id = header.split(maxsplit=1)[0]
            if check_duplicates:
                if rec_id in seen:
                    raise FastaError(f"{name}:{lineno}: duplicate record id {rec_id!r} "
                                     f"(first seen at line {seen[rec_id]})")
                seen[rec_id] = lineno
            continue
        if header is None:
            shown = line if len(line) <= 40 else line[:37] + "..."
            raise FastaError(f"{name}:{lineno}: text before the first '>' header: {shown!r}")
        chunks.append("".join(line.split()))
    if header is not None:
        yield finish()


def write_fasta(
    path_or_file: str | os.PathLike | IO[str],
    records: Iterable[Any],
    width: int | None = 60,
) -> int:
    """Write records and return how many were written.

    ``records``: ``FastaRecord``s (the header is their ``description``, or the id if that is empty) or
    ``(id, sequence)`` / ``(id, description, sequence)`` tuples. ``width``: residues per line
    (None or 0: one line per sequence). A path ending in ``.gz`` is gzip-compressed.
    """
    if width is not None and width < 0:
        raise ValueError(f"width must be positive or None, got {width}")
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        if path.endswith(".gz"):
            fh: Any = gzip.open(path, "wt", encoding="utf-8", newline="\n")
        else:
            fh = open(path, "w", encoding="utf-8", newline="\n")
        owned = True
    else:
        fh, owned = path_or_file, False
    n = 0
    try:
        for rec in records:
            if isinstance(rec, FastaRecord):
                header, seq = rec.description or rec.id, rec.sequence
            elif isinstance(rec, (tuple, list)) and len(rec) == 2:
                header, seq = rec
            elif isinstance(rec, (tuple, list)) and len(rec) == 3:
                header, seq = rec[1] or rec[0], rec[2]
            else:
                raise TypeError(f"record {n}: expected a FastaRecord or an (id, sequence) tuple, got {rec!r}")
            header, seq = str(header), str(seq)
            if not header.strip() or "\n" in header or "\r" in header:
                raise ValueError(f"record {n}: invalid header {header!r}")
            fh.write(">" + header + "\n")
            if width:
                for i in range(0, len(seq), width):
                    fh.write(seq[i:i + width] + "\n")
            elif seq:
                fh.write(seq + "\n")
            n += 1
    finally:
        if owned:
            fh.close()
    return n


def count_fasta(path_or_file: str | os.PathLike | IO[bytes] | IO[str], check_duplicates: bool = True,
                allow_empty: bool = False) -> int:
    """Number of records in a FASTA file, counted by :func:`read_fasta` itself (same line splitting, same
    checks: a file that cannot be read fails here). Gzip is detected."""
    return sum(1 for _ in read_fasta(path_or_file, check_duplicates=check_duplicates, allow_empty=allow_empty))


__all__ = ["FastaError", "FastaRecord", "count_fasta", "read_fasta", "write_fasta"]
