"""ESM tokenizer: HF ``vocab.txt``, character-level tokens, special tokens, fast batch encoding to numpy.

``EsmTokenizer`` produces exactly the ids of ``transformers.EsmTokenizer`` (same vocabulary file), including
its less obvious rules, which come from HF's added-token trie followed by ``str.split()``:

* every vocabulary entry is matched greedily in the text (``"AC<mask>D<cls>"`` -> A C <mask> D <cls>);
* whitespace between tokens is dropped (``" A C\\n"`` -> A C);
* a *run* of characters that are not in the vocabulary and not separated by whitespace becomes ONE
  ``<unk>`` (``"AJJC"`` -> A <unk> C, ``"acd"`` -> <unk>); use ``strict=True`` to reject such input;
* the empty string gives no residue tokens (``<cls> <eos>`` with special tokens).

Plain residue strings (ASCII, no whitespace, no ``<``) take a vectorised path: one numpy lookup over the
bytes of the whole batch, so 100,000 UniRef-sized sequences encode in about a second. Anything else
goes through a faithful re-implementation of the HF trie split.

The vocabulary file and HF's trie split are in ``common.vocab``, the ragged-row numpy work behind the output
(truncation, special tokens, padding, tensors) and ``BatchEncoding`` in ``common.batch_encoding``, and the
rest of HF's tokenizer surface (``pad``, special-token helpers, ``save_pretrained``/``from_pretrained``) in
``common.tokenizer_hf``'s ``HFTokenizerMixin``.

This module imports numpy only; ``return_tensors="pt"``/``"tf"`` import torch/TensorFlow inside the call.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .batch_encoding import BatchEncoding, assemble, pad_rows, ragged_positions, row_offsets, split_rows
from .config import DEFAULT_VOCAB
from .tokenizer_hf import VERY_LARGE_INTEGER, HFTokenizerMixin, check_pad_to_multiple_of
from .vocab import SPECIAL_ATTRS, build_trie, load_vocab_file, split_on_tokens

_WORD = re.compile(r"\S+")  # same whitespace as str.split() (both use Py_UNICODE_ISSPACE)
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerError(ValueError):
    """Input the tokenizer refuses (strict mode); the message names the record, position and character.

    ``index`` (the sequence's index in the call), ``character`` and ``position`` (1-based) say the same for
    programs, or are None."""

    def __init__(self, message: str, index: int | None = None, character: str | None = None,
                 position: int | None = None):
        super().__init__(message)
        self.index, self.character, self.position = index, character, position


def _clean_up(text: str) -> str:
    for a, b in _CLEANUPS:
        text = text.replace(a, b)
    return text


def _label(index: int, ids: Sequence[Any] | None) -> str:
    if ids is not None and index < len(ids):
        return f"record {index} ({ids[index]!r})"
    return f"record {index}"


class EsmTokenizer(HFTokenizerMixin):
    """ESM tokenizer, id-for-id compatible with ``transformers.EsmTokenizer``.

    Args:
        vocab_file: path to a ``vocab.txt`` (one token per line). Default: the 33-token ESM alphabet.
        vocab: the tokens as a list instead of a file.
        strict: raise ``TokenizerError`` on characters that would become ``<unk>`` (default: map them
            to ``<unk>`` like HF). Can be overridden per call.
        model_max_length: as in HF; ``max_length=None`` with truncation/``padding="max_length"`` uses it.
    """

    model_input_names = ["input_ids", "attention_mask"]
    is_fast = False

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        *,
        vocab: Sequence[str] | None = None,
        unk_token: str = "<unk>",
        cls_token: str = "<cls>",
        pad_token: str = "<pad>",
        mask_token: str = "<mask>",
        eos_token: str = "<eos>",
        strict: bool = False,
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> None:
        if vocab_file is not None and vocab is not None:
            raise ValueError("give either vocab_file or vocab, not both")
        if vocab_file is not None:
            tokens = load_vocab_file(vocab_file)
        else:
            tokens = [str(t) for t in (DEFAULT_VOCAB if vocab is None else vocab)]
        if padding_side not in ("right", "left") or truncation_side not in ("right", "left"):
            raise ValueError("padding_side and truncation_side must be 'right' or 'left'")
        self.all_tokens: list[str] = tokens
        self.strict = bool(strict)
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.pad_token_type_id = 0
        self._special = {"eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token,
                         "cls_token": cls_token, "mask_token": mask_token}
        self._tok2id: dict[str, int] = {tok: i for i, tok in enumerate(tokens)}  # duplicates: last wins (HF)
        self._id2tok: dict[int, str] = dict(enumerate(tokens))
        # Special tokens missing from the file are appended, in HF's order.
        for attr in SPECIAL_ATTRS:
            tok = self._special[attr]
            if tok and tok not in self._tok2id:
                new_id = len(self._tok2id)
                self._tok2id[tok] = new_id
                self._id2tok[new_id] = tok
        self._no_split = {self._special[a] for a in SPECIAL_ATTRS if self._special[a]}
        self._trie = build_trie(self._tok2id)
        self._build_lut()

    # ---- vocabulary ----------------------------------------------------------------------------
    def _build_lut(self) -> None:
        """Byte -> id for single-character ASCII tokens; -1 unknown; -2 needs the general path."""
        lut = np.full(256, -1, dtype=np.int32)
        for tok, idx in self._tok2id.items():
            if len(tok) == 1 and ord(tok) < 128:
                lut[ord(tok)] = idx
        for tok in self._tok2id:
            if len(tok) > 1 and ord(tok[0]) < 128:
                lut[ord(tok[0])] = -2  # may start a multi-character token
        for b in range(128):
            if chr(b).isspace():
                lut[b] = -2
        lut[128:] = -2
        self._lut = lut

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary file (HF's ``vocab_size``)."""
        return len(self.all_tokens)

    def __len__(self) -> int:
        return len(self._tok2id)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._tok2id)

    def _id(self, attr: str) -> int | None:
        tok = self._special[attr]
        return self._tok2id.get(tok) if tok else None

    unk_token = property(lambda self: self._special["unk_token"])
    cls_token = property(lambda self: self._special["cls_token"])
    pad_token = property(lambda self: self._special["pad_token"])
    mask_token = property(lambda self: self._special["mask_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    unk_token_id = property(lambda self: self._id("unk_token"))
    cls_token_id = property(lambda self: self._id("cls_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    mask_token_id = property(lambda self: self._id("mask_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    # ESM has no separate BOS/SEP: <cls> starts a sequence and <eos> ends it (aliases, not in HF).
    bos_token_id = property(lambda self: self._id("cls_token"))
    sep_token_id = property(lambda self: self._id("eos_token"))

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._special[a] for a in SPECIAL_ATTRS if self._special[a]]

    @property
    def all_special_ids(self) -> list[int]:
        return [self._tok2id[t] for t in self.all_special_tokens]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str] | None) -> int | list[int] | None:
        if tokens is None:
            return None
        unk = self.unk_token_id
        if isinstance(tokens, str):
            return self._tok2id.get(tokens, unk)
        return [self._tok2id.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        unk = self.unk_token
        if isinstance(ids, (int, np.integer)):
            return self._id2tok.get(int(ids), unk)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        out = []
        for i in _as_id_list(ids):
            if i not in skip:
                out.append(self._id2tok.get(i, unk))
        return out

    # ---- tokenisation (general path) -----------------------------------------------------------
    def _tokenize_positions(self, text: str) -> tuple[list[str], list[int]]:
        tokens: list[str] = []
        starts: list[int] = []
        for off, piece in split_on_tokens(self._trie, text):
            if piece in self._no_split:
                tokens.append(piece)
                starts.append(off)
            else:
                for m in _WORD.finditer(piece):
                    tokens.append(m.group())
                    starts.append(off + m.start())
        return tokens, starts

    def tokenize(self, text: str) -> list[str]:
        """Tokens of ``text`` exactly as ``transformers.EsmTokenizer.tokenize``."""
        return self._tokenize_positions(text)[0]

    def _encode_general(self, text: str, strict: bool, index: int, ids: Sequence[Any] | None) -> list[int]:
        tokens, starts = self._tokenize_positions(text)
        unk = self.unk_token_id
        out = [self._tok2id.get(t, unk) for t in tokens]
        if strict:
            for tok, pos, i in zip(tokens, starts, out):
                if i == unk and tok != self.unk_token:
                    raise TokenizerError(f"{_label(index, ids)}: invalid character {text[pos]!r} "
                                         f"at position {pos + 1}", index, text[pos], pos + 1)
        return out

    # ---- fast batch encoding -------------------------------------------------------------------
    def _encode_flat(
        self, seqs: Sequence[Any], strict: bool | None = None, ids: Sequence[Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Residue ids (no special tokens) of every sequence: (flat int64 ids, offsets [B + 1]).

        Items may be strings or already-encoded id sequences (list/tuple/array of ints).
        """
        strict = self.strict if strict is None else bool(strict)
        B = len(seqs)
        if ids is not None and len(ids) != B:
            raise ValueError(f"ids has {len(ids)} entries for {B} sequences")
        joined = None
        if all(type(s) is str for s in seqs):
            joined = "".join(seqs)
            if not joined.isascii():
                joined = None
        if joined is not None:
            fast_idx = np.arange(B)
            buf = joined.encode("ascii")
            del joined
        else:  # pre-encoded ids or non-ASCII text present: vectorise the plain-ASCII strings only
            fast_idx = np.asarray([i for i, s in enumerate(seqs) if isinstance(s, str) and s.isascii()],
                                  dtype=np.int64)
            buf = "".join(seqs[i] for i in fast_idx.tolist()).encode("ascii")
        lengths = np.fromiter((len(seqs[i]) for i in fast_idx.tolist()), dtype=np.int64, count=len(fast_idx))
        codes = self._lut[np.frombuffer(buf, dtype=np.uint8)]
        del buf
        # Records with whitespace, '<' etc. go to the general path.
        trig = np.flatnonzero(codes == -2)
        if trig.size:
            ends = np.cumsum(lengths)
            bad = np.zeros(len(fast_idx), dtype=bool)
            bad[np.unique(np.searchsorted(ends, trig, side="right"))] = True
            codes = codes[~np.repeat(bad, lengths)]
            fast_idx, lengths = fast_idx[~bad], lengths[~bad]
        slow_idx = sorted(set(range(B)) - set(fast_idx.tolist())) if len(fast_idx) != B else []

        # Characters outside the vocabulary: a run of them within a record is one <unk> (HF).
        unk_mask = codes == -1
        first_error: tuple[int, TokenizerError] | None = None
        if unk_mask.any():
            rows, pos = ragged_positions(lengths)
            if strict:
                p = int(np.flatnonzero(unk_mask)[0])
                rec = int(fast_idx[rows[p]])
                col = int(pos[p])
                first_error = (rec, TokenizerError(f"{_label(rec, ids)}: invalid character {seqs[rec][col]!r} "
                                                   f"at position {col + 1}", rec, seqs[rec][col], col + 1))
            else:
                drop = unk_mask.copy()
                drop[1:] &= unk_mask[:-1]
                drop[0] = False
                drop &= pos != 0
                codes[unk_mask] = self.unk_token_id
                if drop.any():
                    lengths = lengths - np.bincount(rows[drop], minlength=len(lengths))
                    codes = codes[~drop]
            del rows, pos
        codes = codes.astype(np.int64)

        if not slow_idx:
            if first_error is not None:
                raise first_error[1]
            return codes, row_offsets(lengths)

        # Merge general-path records (and pre-encoded ids) with the vectorised ones, in input order.
        slow_ids: dict[int, np.ndarray] = {}
        for i in slow_idx:
            if first_error is not None and i > first_error[0]:
                raise first_error[1]
            s = seqs[i]
            if isinstance(s, str):
                slow_ids[i] = np.asarray(self._encode_general(s, strict, i, ids), dtype=np.int64)
            else:
                slow_ids[i] = _as_id_array(s, i)
        if first_error is not None:
            raise first_error[1]
        all_len = np.zeros(B, dtype=np.int64)
        all_len[fast_idx] = lengths
        for i, a in slow_ids.items():
            all_len[i] = len(a)
        off = row_offsets(all_len)
        flat = np.empty(int(off[-1]), dtype=np.int64)
        if len(codes):
            rows, pos = ragged_positions(lengths)
            flat[off[fast_idx][rows] + pos] = codes
        for i, a in slow_ids.items():
            flat[off[i]:off[i + 1]] = a
        return flat, off

    def encode_residues_np(
        self, seqs: Iterable[str], strict: bool | None = None, ids: Sequence[Any] | None = None
    ) -> list[np.ndarray]:
        """Residue ids of each sequence (no <cls>/<eos>) as int64 arrays (views of one buffer)."""
        seqs = seqs if isinstance(seqs, list) else list(seqs)
        flat, off = self._encode_flat(seqs, strict, ids)
        return split_rows(flat, off)

    def encode_batch(
        self,
        seqs: Iterable[str],
        add_special_tokens: bool = True,
        max_length: int | None = None,
        strict: bool | None = None,
        ids: Sequence[Any] | None = None,
    ) -> list[np.ndarray]:
        """Token ids of each sequence (with <cls>/<eos> by default) as int64 arrays.

        ``max_length`` truncates residues so that each output, special tokens included, fits in it.
        """
        seqs = seqs if isinstance(seqs, list) else list(seqs)
        if not seqs:
            return []
        flat, off = self._encode_flat(seqs, strict, ids)
        enc = assemble(flat, off, None, None, add_special_tokens,
                       "longest_first" if max_length is not None else "do_not_truncate", max_length,
                       cls_token_id=self.cls_token_id, eos_token_id=self.eos_token_id,
                       truncation_side=self.truncation_side)
        return split_rows(enc["input_ids"], enc["offsets"])

    def encode(self, text: Any, text_pair: Any = None, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        """``self(text, text_pair, ...)["input_ids"]`` (HF's ``encode``)."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    # ---- __call__ ------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[Any],
        text_pair: str | Sequence[Any] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        strict: bool | None = None,
        ids: Sequence[Any] | str | None = None,
    ) -> BatchEncoding:
        """Encode one sequence, a batch, or pairs; arguments and outputs as ``transformers.EsmTokenizer``.

        ``text`` is a string (or a list of ids), a list of strings, or a list of (text, pair) tuples.
        ``return_tensors``: None (python lists), "np" (int64), "pt" (int64) or "tf" (int32, as HF's TF
        tokenizers returned). A single sequence gets a batch axis when tensors are returned.
        ``strict``/``ids``: see the class; ``ids`` names the records in error messages.
        """
        pad, trunc, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        if padding_side is not None and padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        batched = isinstance(text, (list, tuple)) and (
            not text or isinstance(text[0], (str, list, tuple, np.ndarray)))
        if batched:
            if not text:
                raise ValueError("You should supply an encoding or a list of encodings to this method that "
                                 "includes input_ids, but you provided []")
            if text_pair is not None:
                if not isinstance(text_pair, (list, tuple)) or len(text_pair) != len(text):
                    raise ValueError(
                        "If `text` is a batch, `text_pair` must also be a batch of the same length.")
                firsts, seconds = list(text), list(text_pair)
            else:
                firsts, seconds = [], []
                for item in text:
                    is_ids = isinstance(item, (list, tuple)) and bool(item) and \
                        isinstance(item[0], (int, np.integer))
                    if isinstance(item, (list, tuple)) and item and not is_ids:
                        if len(item) == 2 and all(isinstance(x, (str, list, tuple)) for x in item):
                            firsts.append(item[0])
                            seconds.append(item[1])
                            continue
                        if len(item) == 1:
                            item = item[0]
                        else:
                            raise ValueError(f"Expected a pair of sequences, got {len(item)} sequences.")
                    firsts.append(item)
                    seconds.append(None)
                n_pairs = sum(s is not None for s in seconds)
                if n_pairs == 0:
                    seconds = []
                elif n_pairs != len(seconds):
                    raise ValueError("mixing single sequences and pairs in one batch is not supported")
        else:
            firsts = [text]
            seconds = [] if text_pair is None else [text_pair]
            if isinstance(ids, str):
                ids = [ids]
        if isinstance(ids, str):
            raise ValueError("ids must be a sequence of record names, one per sequence")

        flat0, off0 = self._encode_flat(firsts, strict, ids)
        flat1 = off1 = None
        if seconds:
            flat1, off1 = self._encode_flat(seconds, strict, ids)
        enc = assemble(flat0, off0, flat1, off1, add_special_tokens, trunc, max_length,
                       cls_token_id=self.cls_token_id, eos_token_id=self.eos_token_id,
                       truncation_side=self.truncation_side, return_token_type_ids=bool(return_token_type_ids),
                       return_special_tokens_mask=return_special_tokens_mask)
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        return pad_rows(
            enc, pad, max_length, pad_to_multiple_of, padding_side or self.padding_side,
            bool(return_attention_mask), return_tensors, return_length, batched,
            pad_token_id=self.pad_token_id, pad_token_type_id=self.pad_token_type_id)

    # ---- decoding ------------------------------------------------------------------------------
    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Tokens joined by single spaces, as HF (``"<cls> M K <eos>"``)."""
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        text = tokens if isinstance(tokens, str) else " ".join(tokens)
        return _clean_up(text) if clean_up_tokenization_spaces else text

    def __repr__(self) -> str:
        return (f"EsmTokenizer(vocab_size={self.vocab_size}, strict={self.strict}, "
                f"model_max_length={self.model_max_length})")


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _as_id_array(seq: Any, index: int) -> np.ndarray:
    arr = np.asarray(seq)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(
            f"record {index}: expected a string or a sequence of token ids, got {type(seq).__name__}")
    return arr.astype(np.int64)


_DEFAULT: EsmTokenizer | None = None


def encode_residues_np(seqs: Iterable[str], strict: bool = False, ids: Sequence[Any] | None = None
                       ) -> list[np.ndarray]:
    """Residue ids (no <cls>/<eos>) of each sequence under the default ESM alphabet, as int64 arrays."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = EsmTokenizer()
    return _DEFAULT.encode_residues_np(seqs, strict=strict, ids=ids)


__all__ = ["BatchEncoding", "EsmTokenizer", "TokenizerError", "check_pad_to_multiple_of", "encode_residues_np",
           "load_vocab_file"]
