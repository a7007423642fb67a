"""The tokenizer surface HF collators, ``datasets`` and pipelines use (``common.tokenizer_hf``: ``pad``, the
special-token helpers, ``save_pretrained``/``from_pretrained``), against ``transformers.EsmTokenizer``."""

from __future__ import annotations

import json
import os
import sys
import types
import warnings

import numpy as np
import pytest

from esm_dual.common.config import DEFAULT_VOCAB
from esm_dual.common.tokenizer import EsmTokenizer

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
transformers.utils.logging.set_verbosity_error()

SEQS = ["MKTAYIAKQR", "MKV", "ACDEFGHIKLMN", "W"]
BATCH = ["MKTAYIAKQRQISFVKSHFSRQ", "ACD", "", "A<mask>CJJD", "kl", "MKTAYIAKQ"]


def _plain(x):
    """Lists/tensors/arrays -> nested python lists, with the container type noted, for comparison."""
    if isinstance(x, torch.Tensor):
        return ("pt", str(x.dtype), x.tolist())
    if isinstance(x, np.ndarray):
        return ("np", str(x.dtype), x.tolist())
    return ("py", x)


def _same(a, b):
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert _plain(a[k]) == _plain(b[k]), k


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("kwargs", [
    {}, {"return_tensors": "pt"}, {"return_tensors": "np"}, {"pad_to_multiple_of": 8, "return_tensors": "pt"},
    {"padding_side": "left", "return_tensors": "pt"}, {"padding": "max_length", "max_length": 20},
    {"padding": False}, {"return_attention_mask": False, "padding": True},
])
def test_pad_list_of_dicts_matches_hf(hf, tok, kwargs):
    rows = [dict(hf(s, return_special_tokens_mask=True)) for s in SEQS]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    if kwargs.get("return_tensors") and kwargs.get("padding", True) is not False:
        rows = [{k: v for k, v in r.items() if k != "labels"} for r in rows]  # ragged labels: not padded
    ours = tok.pad([dict(r) for r in rows], **kwargs)
    ref = _quiet(hf.pad, [dict(r) for r in rows], **kwargs)
    _same(ours, ref)


def test_pad_dict_of_lists_and_tensors_matches_hf(hf, tok):
    enc = dict(hf(SEQS))
    _same(tok.pad(dict(enc), return_tensors="pt"), _quiet(hf.pad, dict(enc), return_tensors="pt"))
    # Tensor rows (what a torch Dataset gives): return type follows the input, as HF.
    rows = [{"input_ids": torch.tensor(hf(s)["input_ids"])} for s in SEQS]
    _same(tok.pad(rows), _quiet(hf.pad, rows))
    rows = [{"input_ids": np.asarray(hf(s)["input_ids"])} for s in SEQS]
    _same(tok.pad(rows), _quiet(hf.pad, rows))
    # A single unbatched encoding.
    one = dict(hf("MKV"))
    _same(tok.pad(one, padding="max_length", max_length=8), _quiet(hf.pad, one, padding="max_length", max_length=8))


def test_pad_errors(tok):
    with pytest.raises(ValueError, match="input_ids"):
        tok.pad([{"attention_mask": [1, 1]}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        tok.pad([{"input_ids": [0, 5, 2]}], pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="padding_side"):
        tok.pad([{"input_ids": [0, 5, 2]}], padding_side="middle")


def test_pad_to_multiple_of_zero_is_a_clear_error(tok):
    # 19.13: ZeroDivisionError before.
    for bad in (0, -8):
        with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
            tok(SEQS, padding=True, pad_to_multiple_of=bad)


@pytest.mark.parametrize("max_length", [0, 1, -3])
def test_tiny_max_length_with_truncation_is_a_clear_error(tok, max_length):
    # 19.13: returned [cls, eos] silently before.
    with pytest.raises(ValueError, match="max_length"):
        tok(SEQS, truncation=True, max_length=max_length)
    with pytest.raises(ValueError, match="max_length"):
        tok("MKV", max_length=max_length)
    # Without special tokens max_length 1 keeps one residue, as HF.
    if max_length == 1:
        assert tok("MKV", max_length=1, add_special_tokens=False)["input_ids"] == [20]
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(SEQS, max_length=max_length)


def test_pair_needs_three_special_positions(tok):
    with pytest.raises(ValueError, match="max_length"):
        tok("MKV", "AC", truncation=True, max_length=2)


def test_special_token_surface_matches_hf(hf, tok):
    assert list(tok.model_input_names) == list(hf.model_input_names)
    for attr in ("cls_token", "eos_token", "pad_token", "mask_token", "unk_token", "cls_token_id", "eos_token_id",
                 "pad_token_id", "mask_token_id", "unk_token_id", "all_special_tokens", "all_special_ids",
                 "vocab_size", "padding_side", "truncation_side"):
        assert getattr(tok, attr) == getattr(hf, attr), attr
    assert len(tok) == len(hf)
    assert tok.special_tokens_map == hf.special_tokens_map
    assert tok.convert_tokens_to_ids(["<mask>", "A", "J", "<cls>"]) == hf.convert_tokens_to_ids(
        ["<mask>", "A", "J", "<cls>"])
    assert tok.convert_ids_to_tokens([0, 5, 32, 2]) == hf.convert_ids_to_tokens([0, 5, 32, 2])
    assert tok.convert_ids_to_tokens(torch.tensor([0, 5, 2])) == hf.convert_ids_to_tokens([0, 5, 2])
    ids = hf(SEQS, padding=True, return_tensors="pt")["input_ids"]
    for skip in (False, True):
        assert tok.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(ids, skip_special_tokens=skip)
    for s in SEQS:
        row = hf(s)["input_ids"]
        assert tok.get_special_tokens_mask(row, already_has_special_tokens=True) == \
            hf.get_special_tokens_mask(row, already_has_special_tokens=True)
    ours = tok(SEQS, return_special_tokens_mask=True, padding=True)
    ref = _quiet(hf, SEQS, return_special_tokens_mask=True, padding=True)
    assert ours["special_tokens_mask"] == ref["special_tokens_mask"]


def test_auto_tokenizer_reads_our_directory_and_we_read_hf(tmp_path, hf, tok):
    tok.save_pretrained(tmp_path / "ours")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert auto(SEQS, padding=True)["input_ids"] == tok(SEQS, padding=True)["input_ids"]
    hf.save_pretrained(tmp_path / "theirs")
    back = EsmTokenizer.from_pretrained(tmp_path / "theirs")
    assert back(SEQS, padding=True)["input_ids"] == tok(SEQS, padding=True)["input_ids"]


def _rows(tok, with_labels=False):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"seq": SEQS, "y": [0, 1, 1, 0]})

    def enc(batch):
        out = tok(batch["seq"])
        if with_labels:
            out["labels"] = [[-100] + [i % 3 for i in range(len(s))] + [-100] for s in batch["seq"]]
        return out

    return ds.map(enc, batched=True, remove_columns=["seq"] + ([] if not with_labels else ["y"]))


@pytest.mark.parametrize("collator", ["padding", "token", "mlm"])
def test_hf_collators_on_datasets_rows_match_hf(hf, tok, collator):
    ours_rows = _rows(tok, with_labels=collator == "token")
    ref_rows = _rows(hf, with_labels=collator == "token")
    assert ours_rows.to_dict() == ref_rows.to_dict()
    rows = [ours_rows[i] for i in range(len(ours_rows))]

    def make(t):
        if collator == "padding":
            return transformers.DataCollatorWithPadding(t, pad_to_multiple_of=8)
        if collator == "token":
            return transformers.DataCollatorForTokenClassification(t)
        return transformers.DataCollatorForLanguageModeling(t, mlm_probability=0.5, seed=3)

    ours = make(tok)(rows)
    ref = make(hf)(rows)
    assert sorted(ours.keys()) == sorted(ref.keys())
    for k in ref.keys():
        assert torch.equal(ours[k], ref[k]), k
    if collator == "mlm":
        assert (ours["labels"] != -100).any()


def test_from_pretrained_hub_arguments(tmp_path, monkeypatch, tok):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    snap = tmp_path / "snap"
    tok.save_pretrained(snap / "tokenizer")
    (snap / "tokenizer" / "config.json").write_text(json.dumps({"model_type": "esm"}))
    seen = []

    def snapshot_download(repo_id, **kwargs):
        seen.append(kwargs)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    back = EsmTokenizer.from_pretrained("someone/esm", revision="r1", token="hf_SECRET", subfolder="tokenizer")
    assert seen[0]["revision"] == "r1" and seen[0]["token"] == "hf_SECRET"
    assert back(SEQS)["input_ids"] == tok(SEQS)["input_ids"]
    with pytest.raises(ValueError, match="padding_side"):
        tok(SEQS, padding=True, padding_side="middle")


# ---- files ---------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_and_hf_loads_it(tmp_path, hf):
    tok = EsmTokenizer(model_max_length=1024)
    paths = tok.save_pretrained(tmp_path / "tok")
    assert all(os.path.isfile(p) for p in paths)
    text = (tmp_path / "tok" / "vocab.txt").read_text(encoding="utf-8")
    assert text.split("\n") == list(DEFAULT_VOCAB)
    again = EsmTokenizer.from_pretrained(tmp_path / "tok")
    assert again.get_vocab() == tok.get_vocab() and again.model_max_length == 1024
    ref = transformers.EsmTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert ref.get_vocab() == tok.get_vocab()
    assert ref.model_max_length == 1024
    assert ref.all_special_ids == tok.all_special_ids
    assert dict(_quiet(ref, BATCH, padding=True)) == dict(again(BATCH, padding=True))
    # A directory saved by HF loads here.
    hf.save_pretrained(str(tmp_path / "hf"))
    from_hf = EsmTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert from_hf.get_vocab() == hf.get_vocab()
    assert dict(from_hf(BATCH)) == dict(_quiet(hf, BATCH))


def test_custom_vocab_round_trip(tmp_path):
    vocab = ["<cls>", "<pad>", "<eos>", "<unk>", "A", "C", "G", "T", "<mask>"]
    tok = EsmTokenizer(vocab=vocab)
    (path,) = tok.save_vocabulary(tmp_path, filename_prefix="dna")
    assert os.path.basename(path) == "dna-vocab.txt"
    loaded = EsmTokenizer.from_pretrained(path)
    assert loaded.all_tokens == vocab
    assert loaded("ACGTN<mask>")["input_ids"] == [0, 4, 5, 6, 7, 3, 8, 2]
    ref = transformers.EsmTokenizer(path)
    assert ref("ACGTN<mask>")["input_ids"] == loaded("ACGTN<mask>")["input_ids"]


def test_from_pretrained_resolves_preset_names(tmp_path, monkeypatch):
    EsmTokenizer(vocab=list(DEFAULT_VOCAB)[:-1] + ["<mask>"]).save_pretrained(tmp_path / "preset")
    calls = []

    def resolve_checkpoint(name):
        calls.append(name)
        return str(tmp_path / "preset")

    fake = types.ModuleType("esm_dual.io.resolve")
    fake.resolve_checkpoint = resolve_checkpoint
    monkeypatch.setitem(sys.modules, "esm_dual.io.resolve", fake)
    tok = EsmTokenizer.from_pretrained("facebook/esm2_t6_8M_UR50D")
    assert calls == ["facebook/esm2_t6_8M_UR50D"]
    assert tok.get_vocab() == EsmTokenizer().get_vocab()
    with open(tmp_path / "preset" / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "EsmTokenizer"


def test_from_pretrained_missing_vocab(tmp_path):
    with pytest.raises(FileNotFoundError):
        EsmTokenizer.from_pretrained(tmp_path)
