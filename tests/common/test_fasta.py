"""Streaming FASTA reader/writer: layouts, gzip, errors naming file/record/line, laziness."""

from __future__ import annotations

import gzip
import io
import os
import types

import pytest

from esm_dual.common.fasta import FastaError, FastaRecord, count_fasta, read_fasta, write_fasta


def _write(tmp_path, name: str, text: str, newline: str = "\n") -> str:
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return str(path)


MULTI = """>sp|P1|ONE first protein
MKTAYIAK
QRQISFVK

SHFSRQ
>P2
ACD

>P3 third  one\twith tabs
EFGH
IK
"""
EXPECTED = [
    FastaRecord("sp|P1|ONE", "sp|P1|ONE first protein", "MKTAYIAKQRQISFVKSHFSRQ"),
    FastaRecord("P2", "P2", "ACD"),
    FastaRecord("P3", "P3 third  one\twith tabs", "EFGHIK"),
]


def test_multiline_records_and_blank_lines(tmp_path):
    assert list(read_fasta(_write(tmp_path, "a.fasta", MULTI))) == EXPECTED
    assert count_fasta(_write(tmp_path, "b.fasta", MULTI)) == 3


def test_crlf(tmp_path):
    path = _write(tmp_path, "crlf.fasta", MULTI, newline="\r\n")
    assert b"\r\n" in open(path, "rb").read()
    records = list(read_fasta(path))
    assert records == EXPECTED
    assert all("\r" not in r.sequence and "\r" not in r.description for r in records)


def test_gzip_detected_by_content(tmp_path):
    for name in ("x.fasta.gz", "x.fa"):  # gzip recognised by its magic bytes, not only the suffix
        path = tmp_path / name
        with gzip.open(path, "wt") as f:
            f.write(MULTI)
        assert list(read_fasta(str(path))) == EXPECTED
        assert count_fasta(str(path)) == 3


def test_file_objects_text_and_binary():
    assert list(read_fasta(io.StringIO(MULTI))) == EXPECTED
    assert list(read_fasta(io.BytesIO(MULTI.encode()))) == EXPECTED
    assert list(read_fasta(gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(MULTI.encode()))))) == EXPECTED
    assert count_fasta(io.StringIO(MULTI)) == 3


def test_comments_and_whitespace_before_first_header(tmp_path):
    text = "\n   \n# exported by tool\n; old-style comment\n" + MULTI
    assert list(read_fasta(_write(tmp_path, "c.fasta", text))) == EXPECTED


def test_text_before_first_header_is_an_error(tmp_path):
    path = _write(tmp_path, "junk.fasta", "\n# ok\nMKV\n" + MULTI)
    with pytest.raises(FastaError) as err:
        list(read_fasta(path))
    msg = str(err.value)
    assert "junk.fasta:3" in msg and "before the first" in msg


def test_duplicate_id_names_file_record_and_lines(tmp_path):
    path = _write(tmp_path, "dup.fasta", ">A one\nMK\n>B\nAC\n>A two\nGG\n")
    it = read_fasta(path)
    assert next(it) == FastaRecord("A", "A one", "MK")
    assert next(it) == FastaRecord("B", "B", "AC")
    with pytest.raises(FastaError) as err:
        next(it)
    msg = str(err.value)
    assert "dup.fasta:5" in msg and "'A'" in msg and "line 1" in msg
    assert [r.id for r in read_fasta(path, check_duplicates=False)] == ["A", "B", "A"]


def test_empty_sequence_names_file_record_and_line(tmp_path):
    for text, line in ((">A\nMK\n>B desc\n\n>C\nAC\n", 3), (">A\nMK\n>B desc\n", 3)):
        path = _write(tmp_path, "empty.fasta", text)
        with pytest.raises(FastaError) as err:
            list(read_fasta(path))
        msg = str(err.value)
        assert f"empty.fasta:{line}" in msg and "'B'" in msg and "empty sequence" in msg
    records = list(read_fasta(path, allow_empty=True))
    assert records[-1] == FastaRecord("B", "B desc", "")


def test_empty_header_is_an_error(tmp_path):
    with pytest.raises(FastaError, match=r"h\.fasta:3: empty header"):
        list(read_fasta(_write(tmp_path, "h.fasta", ">A\nMK\n>  \nAC\n")))


def test_fasta_error_is_value_error():
    assert issubclass(FastaError, ValueError)


class _CountingLines:
    """A file-like object that records how many lines were handed out."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines(keepends=True)
        self.served = 0
        self.name = "counting.fasta"

    def __iter__(self):
        for line in self.lines:
            self.served += 1
            yield line


def test_streaming_yields_before_reading_the_rest():
    body = "".join(f">r{i}\nMKV\nACD\n" for i in range(10_000))
    src = _CountingLines(body)
    it = read_fasta(src)
    assert isinstance(it, types.GeneratorType)
    assert src.served == 0  # nothing is read until the first record is asked for
    first = next(it)
    assert first == FastaRecord("r0", "r0", "MKVACD")
    assert src.served <= 4  # the first record plus the next header
    assert sum(1 for _ in it) == 9_999
    assert src.served == len(src.lines)


def test_error_raised_lazily_after_good_records(tmp_path):
    text = "".join(f">r{i}\nMK\n" for i in range(5)) + ">r2\nMK\n"
    it = read_fasta(io.StringIO(text))
    assert [next(it).id for _ in range(5)] == ["r0", "r1", "r2", "r3", "r4"]
    with pytest.raises(FastaError, match=r"<stream>:11: duplicate record id 'r2' \(first seen at line 5\)"):
        next(it)


def test_write_read_round_trip(tmp_path):
    long = "ACDEFGHIKLMNPQRSTVWY" * 7  # 140 residues
    records = [FastaRecord("x1", "x1 some description", long), ("x2", "MKV"), ("x3", "x3 three", "W")]
    path = str(tmp_path / "out.fasta")
    assert write_fasta(path, records, width=60) == 3
    lines = open(path).read().splitlines()
    assert lines[:4] == [">x1 some description", long[:60], long[60:120], long[120:]]
    assert max(len(line) for line in lines if not line.startswith(">")) == 60
    back = list(read_fasta(path))
    assert back == [FastaRecord("x1", "x1 some description", long), FastaRecord("x2", "x2", "MKV"),
                    FastaRecord("x3", "x3 three", "W")]
    gz = str(tmp_path / "out.fasta.gz")
    write_fasta(gz, back, width=None)
    assert open(gz, "rb").read(2) == b"\x1f\x8b"
    assert gzip.open(gz, "rt").read().splitlines()[1] == long
    assert list(read_fasta(gz)) == back
    buf = io.StringIO()
    write_fasta(buf, back, width=0)
    assert buf.getvalue().splitlines()[1] == long
    with pytest.raises(ValueError):
        write_fasta(io.StringIO(), [("bad\nheader", "MK")])


def _simple_parse(path: str) -> list[tuple[str, str]]:
    out: list[tuple[str, list[str]]] = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                out.append((line[1:], []))
            elif line:
                out[-1][1].append(line)
    return [(h, "".join(s)) for h, s in out]


@pytest.mark.parametrize("name,count", [("some_proteins.fasta", 15), ("few_proteins.fasta", 3),
                                        ("P62593.fasta", 5397)])
def test_real_files(data_dir, name, count):
    path = os.path.join(data_dir, name)
    records = list(read_fasta(path))
    assert len(records) == count == count_fasta(path)
    assert [(r.description, r.sequence) for r in records] == _simple_parse(path)
    assert all(r.id == r.description.split()[0] for r in records)
    if name == "P62593.fasta":
        assert records[1].id == "1|beta-lactamase_D207D|1.42563125"
        assert {len(r.sequence) for r in records} == {286}


# ---- issue 19.2 / 19.11: one reader for counting and reading; every line-end convention, BOM, NBSP --------


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("bom", [False, True])
def test_line_ends_and_bom_read_and_counted_alike(tmp_path, newline, bom):
    raw = MULTI.replace("\n", newline).encode("utf-8")
    if bom:
        raw = b"\xef\xbb\xbf" + raw
    path = tmp_path / "x.fasta"
    path.write_bytes(raw)
    gz = tmp_path / "x.fasta.gz"
    gz.write_bytes(gzip.compress(raw))
    for src in (str(path), str(gz), io.BytesIO(raw), io.StringIO(raw.decode("utf-8"))):
        assert list(read_fasta(src)) == EXPECTED, (newline, bom, src)
    for src in (str(path), str(gz), io.BytesIO(raw), io.StringIO(raw.decode("utf-8"))):
        assert count_fasta(src) == 3, (newline, bom, src)


def test_non_breaking_spaces_read_and_counted_alike(tmp_path):
    text = ">P1 first\nMKT\u00a0AYI\n\u00a0>P2\nACD\u00a0\n"
    path = _write(tmp_path, "nbsp.fasta", text)
    records = list(read_fasta(path))
    assert records == [FastaRecord("P1", "P1 first", "MKTAYI"), FastaRecord("P2", "P2", "ACD")]
    assert count_fasta(path) == 2


def test_count_agrees_with_read_on_odd_files(tmp_path):
    # the shapes that made count_fasta and read_fasta disagree: a '>' inside a sequence line after spaces,
    # form feeds, mixed line ends in one file
    text = ">a\nMK\r>b\r\nAC\n  >c desc\n\x0cDE\n"
    path = _write(tmp_path, "mixed.fasta", text)
    assert [r.id for r in read_fasta(path)] == ["a", "b", "c"]
    assert count_fasta(path) == 3


def test_nul_and_control_characters_in_a_header_are_named(tmp_path):
    path = _write(tmp_path, "nul.fasta", ">good\nMKV\n>bad\x00id\nACD\n")
    with pytest.raises(FastaError) as err:
        list(read_fasta(path))
    msg = str(err.value)
    assert "nul.fasta:3" in msg and "NUL" in msg
    with pytest.raises(FastaError):
        count_fasta(path)  # the count runs the same checks, so a run fails before any model work
