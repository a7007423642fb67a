"""EsmTokenizer against transformers.EsmTokenizer (same vocab.txt) on real proteins and edge cases."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest

from esm_dual.common.tokenizer import BatchEncoding, EsmTokenizer, TokenizerError, encode_residues_np

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()


# ---- helpers (fixtures vocab_file, hf, tok: conftest.py) -------------------------------------------
def _hf_call(hf, *args, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(hf(*args, **kwargs))


def _parse_fasta(path: str, limit: int | None = None) -> list[str]:
    """Independent minimal FASTA parse (the tokenizer tests do not rely on esm_dual.common.fasta)."""
    seqs: list[str] = []
    cur: list[str] | None = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if cur is not None:
                    seqs.append("".join(cur))
                cur = []
            elif line and cur is not None:
                cur.append(line)
    if cur is not None:
        seqs.append("".join(cur))
    return seqs[:limit]


@pytest.fixture(params=["some_proteins.fasta", "few_proteins.fasta", "P62593.fasta"])
def real_seqs(request, data_dir) -> list[str]:
    path = os.path.join(data_dir, request.param)
    assert os.path.isfile(path), path
    seqs = _parse_fasta(path, limit=200 if request.param == "P62593.fasta" else None)
    assert len(seqs) >= 3
    return seqs


# ---- vocabulary ----------------------------------------------------------------------------------
def test_default_vocab_matches_hf(hf, tok):
    default = EsmTokenizer()
    assert default.get_vocab() == hf.get_vocab() == tok.get_vocab()
    assert default.vocab_size == hf.vocab_size == 33
    assert len(default) == len(hf)
    for name in ("cls_token_id", "pad_token_id", "eos_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(default, name) == getattr(hf, name), name
    assert (default.cls_token_id, default.pad_token_id, default.eos_token_id) == (0, 1, 2)
    assert (default.unk_token_id, default.mask_token_id) == (3, 32)
    assert default.all_special_tokens == hf.all_special_tokens
    assert default.all_special_ids == hf.all_special_ids
    assert default.bos_token_id == default.cls_token_id and default.sep_token_id == default.eos_token_id


def test_convert_tokens_and_ids(hf, tok):
    tokens = ["A", "<mask>", "zz", "<null_1>", "-", "J", "<cls>"]
    assert tok.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert tok.convert_tokens_to_ids("W") == hf.convert_tokens_to_ids("W")
    ids = [0, 5, 31, 32, 2, 1, 3, 999]
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
        hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(22) == hf.convert_ids_to_tokens(22)


def test_vocab_missing_special_tokens_appended_like_hf(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["A", "C", "<pad>", "D"]), encoding="utf-8")
    mine, ref = EsmTokenizer(str(path)), transformers.EsmTokenizer(str(path))
    assert mine.get_vocab() == ref.get_vocab()
    assert mine.vocab_size == ref.vocab_size == 4
    assert len(mine) == len(ref) == 8
    assert mine("AC<mask>D")["input_ids"] == ref("AC<mask>D")["input_ids"]


# ---- tokenisation --------------------------------------------------------------------------------
EDGE_CASES = [
    "MKTAYIAKQR", "mktayiakqr", "MkTaY", "AJJC", "AJ JC", "J", "JJJ", "A1*B", "A*", "123", "ACDX", "BUZO",
    " A C ", "A\tC\nD", "A C\r\nD ", "  ", "", " ", "\n", "A\u00a0C", "A\u2003JJ", "Aé", "éA", "ü",
    "AC<mask><mask>D<cls>", "<mask>", "<mask><mask><mask>", "<mask", "mask>", "<MASK>", "<<mask>>",
    "<cls>A<eos>", "<pad>A<eos>", "<unk>", "A<null_1>C", "<null_1", "<cLS>A", "<cl<cls>", "<cls >",
    "A <mask> C", "A<mask> <mask>C", "<mask>J<mask>", ".-.", "A.B-C", "<>", "<<", ">", "A>B<C",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_hf(hf, tok, text):
    assert tok.tokenize(text) == hf.tokenize(text)
    assert dict(tok(text)) == _hf_call(hf, text)
    assert dict(tok(text, add_special_tokens=False)) == _hf_call(hf, text, add_special_tokens=False)


def test_unknown_runs_collapse_to_one_unk(tok):
    # HF behaviour, reproduced: a run of out-of-vocabulary characters is ONE <unk>.
    assert tok("AJJC")["input_ids"] == [0, 5, 3, 23, 2]
    assert tok("acd")["input_ids"] == [0, 3, 2]
    assert tok("AJ JC")["input_ids"] == [0, 5, 3, 3, 23, 2]


def test_real_sequences_match_hf(hf, tok, real_seqs):
    for s in real_seqs:
        assert tok(s)["input_ids"] == hf(s)["input_ids"]
    assert dict(tok(real_seqs)) == _hf_call(hf, real_seqs)
    mine = tok(real_seqs, padding=True, return_tensors="np")
    ref = _hf_call(hf, real_seqs, padding=True, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        assert mine[key].dtype == ref[key].dtype
        np.testing.assert_array_equal(mine[key], ref[key])
    fast = tok.encode_batch(real_seqs)
    assert [a.tolist() for a in fast] == ref_ids(hf, real_seqs)
    res = tok.encode_residues_np(real_seqs)
    assert [a.tolist() for a in res] == [r[1:-1] for r in ref_ids(hf, real_seqs)]
    assert [a.tolist() for a in encode_residues_np(real_seqs)] == [a.tolist() for a in res]


def ref_ids(hf, seqs):
    return [hf(s)["input_ids"] for s in seqs]


_FRAGMENTS = list("ACDEFGHIKLMNPQRSTVWYXBUZO.-") + [
    "<mask>", "<cls>", "<eos>", "<pad>", "<unk>", "<null_1>", "<", ">", "<ma", "<null", "mask", " ", "\t",
    "\n", "J", "j", "a", "1", "*", "é", "\u00a0", "<MASK>", "_", "<c", "<<",
]


def test_random_strings_match_hf(hf, tok):
    rng = random.Random(1234)
    texts = ["".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(0, 14))) for _ in range(3000)]
    for t in texts:
        assert tok.tokenize(t) == hf.tokenize(t), repr(t)
    # One batch mixing the vectorised and the general path: order and lengths must survive the merge.
    assert dict(tok(texts)) == _hf_call(hf, texts)
    assert dict(tok(texts, padding=True, truncation=True, max_length=7, return_special_tokens_mask=True)) == \
        _hf_call(hf, texts, padding=True, truncation=True, max_length=7, return_special_tokens_mask=True)


def test_custom_vocab_with_overlapping_tokens_matches_hf(tmp_path):
    # Multi-character tokens that overlap and share prefixes exercise the trie split.
    vocab = ["<cls>", "<pad>", "<eos>", "<unk>", "A", "B", "AB", "BCD", "ab", "<x", "x>", "C", "D", "abc",
             "bc", "c", "<mask>", "A", "Q Q", "é", "xyzw", "y", "yz"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab), encoding="utf-8")
    mine, ref = EsmTokenizer(str(path)), transformers.EsmTokenizer(str(path))
    assert mine.get_vocab() == ref.get_vocab()
    rng = random.Random(7)
    frags = list("ABCDabcxyzwQ<> éJ") + ["<mask>", "<x", "x>", "Q Q", "xyz", "xyzw"]
    texts = ["".join(rng.choice(frags) for _ in range(rng.randint(0, 10))) for _ in range(4000)]
    for t in texts:
        assert mine.tokenize(t) == ref.tokenize(t), repr(t)
    assert dict(mine(texts)) == _hf_call(ref, texts)
    # A longer token that began before a shorter completed one wins (HF's lookahead).
    assert mine.tokenize("xyzw") == ref.tokenize("xyzw") == ["xyzw"]


def test_pre_encoded_ids_and_mixed_batch(hf, tok):
    batch = ["MKV", [5, 6, 7], "A<mask>C", "Aé", "mkv", (4, 4)]
    expected = [hf(x)["input_ids"] if isinstance(x, str) else hf(list(x))["input_ids"] for x in batch]
    assert tok(batch)["input_ids"] == expected
    assert tok([5, 6, 7])["input_ids"] == hf([5, 6, 7])["input_ids"]


# ---- __call__ options ----------------------------------------------------------------------------
CALL_OPTIONS = [
    dict(),
    dict(padding=True),
    dict(padding="longest"),
    dict(padding="do_not_pad"),
    dict(padding="max_length", max_length=12),
    dict(padding="max_length", max_length=6),  # some rows longer than max_length: ragged, as HF
    dict(padding="max_length"),  # no max_length and no model_max_length: no padding (HF)
    dict(truncation=True, max_length=6),
    dict(truncation=True, max_length=2),
    dict(truncation=True, max_length=1, add_special_tokens=False),
    dict(truncation=True),
    dict(truncation=False, max_length=4),
    dict(max_length=4),  # max_length alone truncates (HF's backward-compatible rule)
    dict(padding=True, max_length=4),  # ... but not with padding=True
    dict(padding=True, truncation=True, max_length=8, pad_to_multiple_of=4),
    dict(padding=True, pad_to_multiple_of=8),
    dict(padding="max_length", max_length=10, padding_side="left"),
    dict(padding=True, return_attention_mask=False),
    dict(padding=True, return_special_tokens_mask=True, return_token_type_ids=True),
    dict(padding=True, add_special_tokens=False, return_special_tokens_mask=True),
    dict(return_length=True),
    dict(padding="max_length", max_length=12, return_length=True),
]
BATCH = ["MKTAYIAKQRQISFVKSHFSRQ", "ACD", "", "A<mask>CJJD", "kl", "MKTAYIAKQ"]


@pytest.mark.parametrize("kwargs", CALL_OPTIONS, ids=[str(k) for k in CALL_OPTIONS])
def test_call_options_match_hf(hf, tok, kwargs):
    assert dict(tok(BATCH, **kwargs)) == _hf_call(hf, BATCH, **kwargs)
    for s in BATCH:
        assert dict(tok(s, **kwargs)) == _hf_call(hf, s, **kwargs)


def test_truncation_cuts_residues_before_specials(tok):
    out = tok(["MKTAYIAKQR", "MK"], truncation=True, max_length=6)["input_ids"]
    assert out == [[0, 20, 15, 11, 5, 2], [0, 20, 15, 2]]
    assert all(len(r) <= 6 for r in out)


def test_truncation_side_left_matches_hf(vocab_file):
    ref = transformers.EsmTokenizer(vocab_file, truncation_side="left")
    mine = EsmTokenizer(vocab_file, truncation_side="left")
    for kwargs in (dict(truncation=True, max_length=5), dict(max_length=4)):
        assert dict(mine(BATCH, **kwargs)) == _hf_call(ref, BATCH, **kwargs)
    assert dict(mine("MKTAYIAKQ", "ACDEFGHIKLMN", truncation=True, max_length=9)) == \
        _hf_call(ref, "MKTAYIAKQ", "ACDEFGHIKLMN", truncation=True, max_length=9)


def test_model_max_length_matches_hf(vocab_file):
    ref = transformers.EsmTokenizer(vocab_file, model_max_length=7)
    mine = EsmTokenizer(vocab_file, model_max_length=7)
    options = (dict(truncation=True), dict(padding="max_length"), dict(padding="max_length", truncation=True))
    for kwargs in options:
        assert dict(mine(BATCH, **kwargs)) == _hf_call(ref, BATCH, **kwargs)


PAIRS = [("MKTAYIAKQR", "ACD"), ("A", "MKTAYIAKQRQISF"), ("ACDEFGHIK", "EFGHIKLMNPQ"), ("", "A"), ("AC", "")]
PAIR_OPTIONS = [
    dict(),
    dict(return_token_type_ids=True, return_special_tokens_mask=True),
    dict(padding=True, return_token_type_ids=True),
    dict(add_special_tokens=False, return_token_type_ids=True, return_special_tokens_mask=True),
    dict(truncation=True, max_length=9),
    dict(truncation="longest_first", max_length=6),
    dict(truncation="only_first", max_length=9),
    dict(truncation="only_second", max_length=9),
    dict(truncation=True, max_length=3),
    dict(padding="max_length", truncation=True, max_length=10, return_token_type_ids=True),
]


@pytest.mark.parametrize("kwargs", PAIR_OPTIONS, ids=[str(k) for k in PAIR_OPTIONS])
def test_pairs_match_hf(hf, tok, kwargs):
    for a, b in PAIRS:
        assert dict(tok(a, b, **kwargs)) == _hf_call(hf, a, b, **kwargs), (a, b)
    firsts, seconds = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    assert dict(tok(firsts, seconds, **kwargs)) == _hf_call(hf, firsts, seconds, **kwargs)
    assert dict(tok(PAIRS, **kwargs)) == _hf_call(hf, PAIRS, **kwargs)


def test_batch_errors_like_hf(hf, tok):
    with pytest.raises(ValueError):
        hf([], padding=True)
    with pytest.raises(ValueError):
        tok([], padding=True)
    with pytest.raises(ValueError):
        tok(["ACD", "EF"], "G")
    with pytest.raises(ValueError):
        tok(["ACD"], padding="sideways")
    with pytest.raises(ValueError):
        tok(["ACDEFG"], padding=True, truncation=True, max_length=6, pad_to_multiple_of=4)


# ---- tensors -------------------------------------------------------------------------------------
def test_return_tensors_np(hf, tok):
    for texts, kwargs in ((BATCH, dict(padding=True)), ("MKV<mask>", {}), (["ACD", "EFG"], {})):
        mine = tok(texts, return_tensors="np", return_special_tokens_mask=True, **kwargs)
        ref = _hf_call(hf, texts, return_tensors="np", return_special_tokens_mask=True, **kwargs)
        assert list(mine) == list(ref)
        for key in ref:
            assert isinstance(mine[key], np.ndarray) and mine[key].dtype == ref[key].dtype == np.int64
            np.testing.assert_array_equal(mine[key], ref[key])
    # Ragged rows without padding: object arrays, as HF.
    mine = tok(["ACD", "A"], return_tensors="np")
    ref = _hf_call(hf, ["ACD", "A"], return_tensors="np")
    assert mine["input_ids"].dtype == object == ref["input_ids"].dtype
    assert [r.tolist() for r in mine["input_ids"]] == [r.tolist() for r in ref["input_ids"]]


def test_return_tensors_pt(hf, tok):
    torch = pytest.importorskip("torch")
    for texts, kwargs in ((BATCH, dict(padding=True)), ("MKV<mask>", {})):
        mine = tok(texts, return_tensors="pt", **kwargs)
        ref = _hf_call(hf, texts, return_tensors="pt", **kwargs)
        for key in ref:
            assert isinstance(mine[key], torch.Tensor) and mine[key].dtype == ref[key].dtype == torch.int64
            assert torch.equal(mine[key], ref[key])
    moved = tok(BATCH, padding=True, return_tensors="pt").to("cpu")
    assert isinstance(moved, BatchEncoding) and moved.input_ids.device.type == "cpu"
    with pytest.raises(ValueError):
        tok(["ACD", "A"], return_tensors="pt")


def test_return_tensors_tf(hf, tok):
    tf = pytest.importorskip("tensorflow")
    # transformers 5 dropped TF tensors; compare with its numpy output. int32, as HF's TF tokenizers gave.
    mine = tok(BATCH, padding=True, return_tensors="tf")
    ref = _hf_call(hf, BATCH, padding=True, return_tensors="np")
    for key in ref:
        assert isinstance(mine[key], tf.Tensor) and mine[key].dtype == tf.int32
        np.testing.assert_array_equal(mine[key].numpy(), ref[key])
    single = tok("MKV", return_tensors="tf")
    assert tuple(single["input_ids"].shape) == (1, 5)


def test_batch_encoding_attribute_access(tok):
    enc = tok(["MKV", "A"], padding=True)
    assert isinstance(enc, dict) and enc.input_ids is enc["input_ids"]
    assert enc.attention_mask == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with pytest.raises(AttributeError):
        _ = enc.token_type_ids


# ---- special-token helpers and decoding -----------------------------------------------------------
def test_special_token_helpers_match_hf(hf, tok):
    a, b = [5, 6, 7], [8, 9]
    assert tok.build_inputs_with_special_tokens(a) == hf.build_inputs_with_special_tokens(a)
    assert tok.build_inputs_with_special_tokens(a, b) == hf.build_inputs_with_special_tokens(a, b)
    assert tok.get_special_tokens_mask(a) == hf.get_special_tokens_mask(a)
    assert tok.get_special_tokens_mask(a, b) == hf.get_special_tokens_mask(a, b)
    with_specials = [0, 5, 3, 1, 32, 31, 2, 2]
    assert tok.get_special_tokens_mask(with_specials, already_has_special_tokens=True) == \
        hf.get_special_tokens_mask(with_specials, already_has_special_tokens=True)
    with pytest.raises(ValueError):
        tok.get_special_tokens_mask(a, b, already_has_special_tokens=True)
    assert tok.create_token_type_ids_from_sequences(a) == hf.create_token_type_ids_from_sequences(a)
    assert tok.create_token_type_ids_from_sequences(a, b) == hf.create_token_type_ids_from_sequences(a, b)
    assert tok.num_special_tokens_to_add() == hf.num_special_tokens_to_add()
    assert tok.num_special_tokens_to_add(pair=True) == hf.num_special_tokens_to_add(pair=True)


def test_decode_matches_hf(hf, tok):
    torch = pytest.importorskip("torch")
    cases = [[0, 5, 23, 13, 32, 2, 1, 1], [5, 999, 31, 30, 29], [], [3, 3]]
    for ids in cases:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert tok.decode(ids, clean_up_tokenization_spaces=True) == \
            hf.decode(ids, clean_up_tokenization_spaces=True)
    assert tok.decode(5) == hf.decode(5)
    assert tok.decode(np.array([0, 5, 6])) == hf.decode(np.array([0, 5, 6]))
    assert tok.decode(torch.tensor([0, 5, 6])) == hf.decode(torch.tensor([0, 5, 6]))
    batch = np.array([[0, 5, 6, 2], [0, 7, 2, 1]])
    assert tok.batch_decode(batch, skip_special_tokens=True) == \
        hf.batch_decode(batch, skip_special_tokens=True)
    assert tok.batch_decode(batch.tolist()) == hf.batch_decode(batch.tolist())
    # decode(encode(x)) spells the residues back.
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    assert tok.decode(tok(seq)["input_ids"], skip_special_tokens=True).replace(" ", "") == seq


# ---- strict mode ---------------------------------------------------------------------------------
def test_strict_mode_errors():
    strict = EsmTokenizer(strict=True)
    assert issubclass(TokenizerError, ValueError)
    with pytest.raises(TokenizerError, match=r"record 3 \('sp\|P1'\): invalid character 'J' at position 17"):
        strict(["MKV", "ACD", "EFG", "MKTAYIAKQRQISFVKJHF"], ids=["a", "b", "c", "sp|P1"])
    # General path (special tokens and whitespace present): positions count characters of the input.
    with pytest.raises(TokenizerError, match=r"record 1: invalid character 'x' at position 10"):
        strict(["MKV", "A<mask> Cx"])
    with pytest.raises(TokenizerError, match=r"record 0: invalid character 'm' at position 1"):
        strict("mkv")
    with pytest.raises(TokenizerError, match=r"invalid character 'é' at position 2"):
        strict("Aé")
    with pytest.raises(TokenizerError, match=r"invalid character '<' at position 4"):
        strict("ACD<mas>")
    # The first bad record is reported, whichever path each record takes.
    with pytest.raises(TokenizerError, match=r"record 1 \('two'\): invalid character '\*'"):
        strict(["MK", "A <mask>*", "MJ"], ids=["one", "two", "three"])
    with pytest.raises(TokenizerError, match=r"record 1 \('two'\): invalid character 'J'"):
        strict(["MK", "MJ", "A <mask>*"], ids=["one", "two", "three"])
    with pytest.raises(TokenizerError):
        strict.encode_residues_np(["MKV", "MZ1"])
    # Per-call override both ways.
    with pytest.raises(TokenizerError, match=r"record 0 \('P1'\)"):
        EsmTokenizer()("AJ", strict=True, ids="P1")
    assert strict("AJ", strict=False)["input_ids"] == [0, 5, 3, 2]


def test_strict_mode_accepts_valid_input(hf):
    strict = EsmTokenizer(strict=True)
    texts = ["MKTAYIAKQR", " A C\tD\n", "AC<mask><mask>D<unk>", "XBUZO.-<null_1>", ""]
    assert dict(strict(texts)) == _hf_call(hf, texts)


def test_import_pulls_in_neither_torch_nor_tensorflow():
    code = (
        "import sys\n"
        "from esm_dual.common.tokenizer import EsmTokenizer\n"
        "import esm_dual.common.fasta\n"
        "t = EsmTokenizer()\n"
        "t(['MKV', 'A<mask>'], padding=True, return_tensors='np')\n"
        "bad = sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.slow
def test_large_batch_is_fast(tok):
    import time

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(270), 0.6, 100_000), 30, 1022).astype(int)
    alphabet = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    chars = alphabet[rng.integers(0, 20, int(lengths.sum()))].tobytes().decode()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    seqs = [chars[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]
    start = time.perf_counter()
    out = tok.encode_batch(seqs)
    elapsed = time.perf_counter() - start
    assert [len(a) for a in out[:100]] == (lengths[:100] + 2).tolist()
    assert elapsed < 30.0, elapsed
