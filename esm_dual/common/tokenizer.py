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

This module imports numpy only; ``return_tensors="pt"``/``"tf"`` import torch/TensorFlow inside the call.
"""

from __future__ import annotations

import gc
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import numpy as np

from .config import DEFAULT_VOCAB

VOCAB_FILE_NAME = "vocab.txt"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"

# HF's "no limit" model_max_length (int(1e30)) and the threshold above which it means "unset".
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

# HF's order of the special-token attributes (``all_special_tokens`` and appending missing ones).
_SPECIAL_ATTRS = ("eos_token", "unk_token", "pad_token", "cls_token", "mask_token")
_PADDINGS = ("longest", "max_length", "do_not_pad")
_TRUNCATIONS = ("longest_first", "only_first", "only_second", "do_not_truncate")
_END = ""  # key marking the end of a token in the trie (text characters are never "")
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


class BatchEncoding(dict):
    """The tokenizer's output: a dict (``enc["input_ids"]``) with attribute access (``enc.input_ids``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any, non_blocking: bool = False) -> BatchEncoding:
        """Move torch tensors to ``device`` (values without ``.to`` are left as they are)."""
        return BatchEncoding({k: v.to(device, non_blocking=non_blocking) if hasattr(v, "to") else v
                              for k, v in self.items()})


def _build_trie(tokens: Iterable[str]) -> dict:
    root: dict = {}
    for tok in tokens:
        if not tok:
            continue
        node = root
        for ch in tok:
            node = node.setdefault(ch, {})
        node[_END] = 1
    return root


def _clean_up(text: str) -> str:
    for a, b in _CLEANUPS:
        text = text.replace(a, b)
    return text


def _label(index: int, ids: Sequence[Any] | None) -> str:
    if ids is not None and index < len(ids):
        return f"record {index} ({ids[index]!r})"
    return f"record {index}"


def _ragged_positions(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ragged rows of ``lengths``: (row of every element, position of every element in its row)."""
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return rows, np.arange(total) - np.repeat(starts, lengths)


def _keep_mask(n: np.ndarray, k: np.ndarray, left: bool) -> np.ndarray:
    """Over ragged rows of lengths ``n``: True for the first (or, ``left``, the last) ``k`` of each row."""
    rows, pos = _ragged_positions(n)
    return pos >= (n - k)[rows] if left else pos < k[rows]


def _split_flat(flat: np.ndarray, off: np.ndarray) -> list[np.ndarray]:
    b = off.tolist()
    return [flat[b[i]:b[i + 1]] for i in range(len(b) - 1)]


def _offsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


class EsmTokenizer:
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
        for attr in _SPECIAL_ATTRS:
            tok = self._special[attr]
            if tok and tok not in self._tok2id:
                new_id = len(self._tok2id)
                self._tok2id[tok] = new_id
                self._id2tok[new_id] = tok
        self._no_split = {self._special[a] for a in _SPECIAL_ATTRS if self._special[a]}
        self._trie = _build_trie(self._tok2id)
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
    def special_tokens_map(self) -> dict[str, str]:
        """The special-token attributes that are set (HF's ``special_tokens_map``)."""
        return {a: self._special[a] for a in ("unk_token", "pad_token", "cls_token", "mask_token", "eos_token")
                if self._special[a]}

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._special[a] for a in _SPECIAL_ATTRS if self._special[a]]

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
    def _split(self, text: str) -> list[tuple[int, str]]:
        """HF's ``Trie.split``: cut ``text`` around vocabulary tokens; (offset, piece) pairs.

        Re-implemented step for step (first completed match wins, extended to the longest match among
        partial matches that began at or before it), so that custom vocabularies behave like HF too.
        """
        root = self._trie
        if not text:
            return []
        if not any(ch in root for ch in set(text)):
            return [(0, text)]
        n = len(text)
        states: dict[int, dict] = {}  # start offset -> trie node, in increasing start order
        cuts = [0]
        skip = 0
        for cur, ch in enumerate(text):
            if skip and cur < skip:
                continue
            dead = []
            matched = False
            for start, node in states.items():
                if _END in node:
                    # A token ends before `cur`. Look for a longer one among partial matches that began at
                    # or before it (the earlier ones have already consumed `cur`, hence cur + 1).
                    end = cur
                    for s2, node2 in states.items():
                        if s2 > start:
                            break
                        i = end = cur + 1 if s2 < start else cur
                        nxt = text[i] if i < n else None
                        if _END in node2:
                            start, end, skip = s2, i, i
                        while nxt in node2:
                            node2 = node2[nxt]
                            i += 1
                            if _END in node2:
                                start, end, skip = s2, i, i
                            if i == n:
                                break
                            nxt = text[i]
                    cuts += (start, end)
                    matched = True
                    break
                if ch in node:
                    states[start] = node[ch]
                else:
                    dead.append(start)
            if matched:
                states = {}
            else:
                for start in dead:
                    del states[start]
            if cur >= skip and ch in root:
                states[cur] = root[ch]
        for start, node in states.items():
            if _END in node:
                cuts += (start, n)
                break
        cuts.append(n)
        pieces = []
        prev = 0
        for end in cuts:
            if end <= prev:
                continue
            pieces.append((prev, text[prev:end]))
            prev = end
        return pieces

    def _tokenize_positions(self, text: str) -> tuple[list[str], list[int]]:
        tokens: list[str] = []
        starts: list[int] = []
        for off, piece in self._split(text):
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
            rows, pos = _ragged_positions(lengths)
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
            return codes, _offsets(lengths)

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
        off = _offsets(all_len)
        flat = np.empty(int(off[-1]), dtype=np.int64)
        if len(codes):
            rows, pos = _ragged_positions(lengths)
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
        return _split_flat(flat, off)

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
        enc = self._assemble(flat, off, None, None, add_special_tokens,
                             "longest_first" if max_length is not None else "do_not_truncate", max_length)
        return _split_flat(enc["input_ids"], enc["offsets"])

    def encode(self, text: Any, text_pair: Any = None, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        """``self(text, text_pair, ...)["input_ids"]`` (HF's ``encode``)."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    # ---- special tokens ------------------------------------------------------------------------
    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        cls, eos = [self.cls_token_id], [self.eos_token_id]
        if token_ids_1 is None:
            return cls + list(token_ids_0) + eos
        return cls + list(token_ids_0) + eos + list(token_ids_1) + eos

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 for special tokens, 0 for residues. With ``already_has_special_tokens`` the ids are inspected
        (every special id counts, ``<unk>`` included, as in HF); otherwise the layout is assumed."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("You should not supply a second sequence if the provided sequence of ids is "
                                 "already formatted with special tokens for the model.")
            special = set(self.all_special_ids)
            return [1 if int(t) in special else 0 for t in token_ids_0]
        mask = [1] + [0] * len(token_ids_0) + [1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """0 over <cls> seq0 <eos>, 1 over seq1 <eos> (HF's BERT-style default)."""
        first = [0] * (len(token_ids_0) + 2)
        return first if token_ids_1 is None else first + [1] * (len(token_ids_1) + 1)

    # ---- __call__ ------------------------------------------------------------------------------
    def _strategies(
        self, padding: Any, truncation: Any, max_length: int | None, pad_to_multiple_of: int | None
    ) -> tuple[str, str, int | None]:
        check_pad_to_multiple_of(pad_to_multiple_of)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
                                       or max_length < 0):
            raise ValueError(f"max_length must be a non-negative integer, got {max_length!r}")
        # HF: max_length alone (no padding, truncation unset) means truncation.
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        if padding is True:
            pad = "longest"
        elif padding is False or padding is None:
            pad = "do_not_pad"
        else:
            pad = str(getattr(padding, "value", padding))
            if pad not in _PADDINGS:
                raise ValueError(f"padding must be True, False or one of {_PADDINGS}, got {padding!r}")
        if truncation is True:
            trunc = "longest_first"
        elif truncation is False or truncation is None:
            trunc = "do_not_truncate"
        else:
            trunc = str(getattr(truncation, "value", truncation))
            if trunc not in _TRUNCATIONS:
                raise ValueError(
                    f"truncation must be True, False or one of {_TRUNCATIONS}, got {truncation!r}")
        if max_length is None:
            if pad == "max_length":
                if self.model_max_length > LARGE_INTEGER:
                    pad = "do_not_pad"
                else:
                    max_length = self.model_max_length
            if trunc != "do_not_truncate":
                if self.model_max_length > LARGE_INTEGER:
                    trunc = "do_not_truncate"
                else:
                    max_length = self.model_max_length
        if (trunc != "do_not_truncate" and pad != "do_not_pad" and pad_to_multiple_of is not None
                and max_length is not None and max_length % pad_to_multiple_of != 0):
            raise ValueError(
                f"Truncation and padding are both activated but truncation length ({max_length}) "
                f"is not a multiple of pad_to_multiple_of ({pad_to_multiple_of}).")
        return pad, trunc, max_length

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
        enc = self._assemble(flat0, off0, flat1, off1, add_special_tokens, trunc, max_length,
                             return_token_type_ids=bool(return_token_type_ids),
                             return_special_tokens_mask=return_special_tokens_mask)
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        return self._pad_and_convert(
            enc, pad, max_length, pad_to_multiple_of, padding_side or self.padding_side,
            bool(return_attention_mask), return_tensors, return_length, batched)

    def _assemble(
        self,
        flat0: np.ndarray,
        off0: np.ndarray,
        flat1: np.ndarray | None,
        off1: np.ndarray | None,
        add_special_tokens: bool,
        trunc: str,
        max_length: int | None,
        return_token_type_ids: bool = False,
        return_special_tokens_mask: bool = False,
    ) -> dict[str, np.ndarray]:
        """Truncate and add special tokens to ragged rows; flat arrays + ``offsets`` of the rows."""
        pair = flat1 is not None
        n0 = np.diff(off0)
        n1 = np.diff(off1) if pair else np.zeros_like(n0)
        ns = (3 if pair else 2) if add_special_tokens else 0
        k0, k1 = n0.copy(), n1.copy()  # lengths kept after truncation
        if trunc != "do_not_truncate" and max_length is not None:
            if max_length < ns:
                raise ValueError(
                    f"max_length={max_length} with truncation leaves no room for the {ns} special tokens "
                    f"(<cls>, <eos>{', <eos>' if pair else ''}); use max_length >= {ns + 1} to keep residues, "
                    "or add_special_tokens=False")
            remove = np.maximum(n0 + n1 + ns - max_length, 0)
            if trunc == "only_first" or (trunc == "longest_first" and not pair):
                k0 = np.maximum(n0 - remove, 0)
            elif trunc == "longest_first":
                first = np.minimum(np.abs(n1 - n0), remove)
                second = remove - first
                from0 = np.where(n0 > n1, first + second // 2, second // 2)
                from1 = remove - from0
                k0 = np.maximum(n0 - from0, 0)
                k1 = np.maximum(n1 - from1, 0)
            elif trunc == "only_second" and pair:
                k1 = np.where(n1 > 0, np.maximum(n1 - remove, 0), n1)
        left = self.truncation_side == "left"
        total = k0 + k1 + ns
        out_off = _offsets(total)
        input_ids = np.empty(int(out_off[-1]), dtype=np.int64)
        want_special = add_special_tokens or return_special_tokens_mask
        special = np.zeros(len(input_ids), dtype=np.int64) if want_special else None
        s0 = 1 if add_special_tokens else 0
        starts = out_off[:-1]
        type_ids = np.zeros(len(input_ids), dtype=np.int64) if return_token_type_ids else None
        if not pair:
            # Residues stay in order: boolean masks instead of index arrays (several times faster).
            src = flat0 if np.array_equal(k0, n0) else flat0[_keep_mask(n0, k0, left)]
            if add_special_tokens:
                is_res = np.ones(len(input_ids), dtype=bool)
                is_res[starts] = False
                is_res[starts + 1 + k0] = False
                input_ids[is_res] = src
            else:
                input_ids[:] = src
        else:
            rows, pos = _ragged_positions(k0)
            src = off0[:-1][rows] + pos + ((n0 - k0)[rows] if left else 0)
            input_ids[starts[rows] + s0 + pos] = flat0[src]
            s1 = s0 + k0 + (1 if add_special_tokens else 0)  # where seq1 starts in each row
            rows, pos = _ragged_positions(k1)
            src = off1[:-1][rows] + pos + ((n1 - k1)[rows] if left else 0)
            dst = out_off[:-1][rows] + s1[rows] + pos
            input_ids[dst] = flat1[src]
            if type_ids is not None and add_special_tokens:
                type_ids[dst] = 1
                type_ids[out_off[1:] - 1] = 1
        if add_special_tokens:
            input_ids[starts] = self.cls_token_id
            input_ids[starts + 1 + k0] = self.eos_token_id
            special[starts] = 1
            special[starts + 1 + k0] = 1
            if pair:
                input_ids[out_off[1:] - 1] = self.eos_token_id
                special[out_off[1:] - 1] = 1
        out = {"input_ids": input_ids}
        if type_ids is not None:
            out["token_type_ids"] = type_ids
        if return_special_tokens_mask:
            out["special_tokens_mask"] = special
        out["offsets"] = out_off
        return out

    def _pad_and_convert(
        self,
        enc: dict[str, np.ndarray],
        pad: str,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        padding_side: str,
        return_attention_mask: bool,
        return_tensors: str | None,
        return_length: bool,
        batched: bool,
    ) -> BatchEncoding:
        off = enc.pop("offsets")
        lengths = np.diff(off)
        B = len(lengths)
        if pad == "do_not_pad":
            target = 0
        else:
            target = int(lengths.max()) if pad == "longest" else int(max_length)
            if pad_to_multiple_of is not None and target % pad_to_multiple_of != 0:
                target = (target // pad_to_multiple_of + 1) * pad_to_multiple_of
        row_len = np.maximum(lengths, target)
        pad_values = {"input_ids": self.pad_token_id, "token_type_ids": self.pad_token_type_id,
                      "special_tokens_mask": 1, "attention_mask": 0}
        if return_attention_mask:
            enc["attention_mask"] = np.ones(int(off[-1]), dtype=np.int64)
        dense = B > 0 and bool(np.all(row_len == row_len[0]))
        out: dict[str, Any] = {}
        if dense:
            L = int(row_len[0])
            col = np.arange(L)
            # [B, L] True where a token goes (row-major order = the order of the flat arrays)
            filled = col >= (L - lengths)[:, None] if padding_side == "left" else col < lengths[:, None]
            for key, flat in enc.items():
                arr = np.full((B, L), pad_values[key], dtype=np.int64)
                arr[filled] = flat
                out[key] = arr
        else:
            bounds = off.tolist()
            extras = (row_len - lengths).tolist()
            gc_was_enabled = gc.isenabled()
            gc.disable()  # building ~1e5 lists of ints: the cyclic GC would rescan them again and again
            try:
                for key, flat in enc.items():
                    pv = pad_values[key]
                    if key == "attention_mask":
                        rows_out = [[1] * (bounds[r + 1] - bounds[r]) for r in range(B)]
                    else:
                        lst = flat.tolist()
                        rows_out = [lst[bounds[r]:bounds[r + 1]] for r in range(B)]
                        del lst
                    for r, extra in enumerate(extras):
                        if extra:
                            row = rows_out[r]
                            rows_out[r] = [pv] * extra + row if padding_side == "left" else row + [pv] * extra
                    out[key] = rows_out
            finally:
                if gc_was_enabled:
                    gc.enable()
        if return_length:
            out["length"] = (row_len if not batched else lengths).astype(np.int64)

        if return_tensors is None:
            res = {}
            for key, v in out.items():
                if key == "length":
                    v = v.tolist()
                    res[key] = v if batched else v[0]
                elif dense:
                    res[key] = v.tolist() if batched else v[0].tolist()
                else:
                    res[key] = v
            return BatchEncoding(res)
        kind = str(getattr(return_tensors, "value", return_tensors))
        if kind not in ("np", "pt", "tf"):
            raise ValueError(f"return_tensors must be None, 'np', 'pt' or 'tf', got {return_tensors!r}")
        res = {}
        for key, v in out.items():
            if not dense and key != "length":
                if kind != "np":
                    raise ValueError(
                        "Unable to create tensor, you should probably activate truncation and/or padding "
                        "with 'padding=True' 'truncation=True' to have batched tensors with the same length "
                        f"(`{key}` has rows of different lengths).")
                ragged = np.empty(B, dtype=object)
                for r, row in enumerate(v):
                    ragged[r] = np.asarray(row, dtype=np.int64)
                res[key] = ragged
                continue
            res[key] = v
        return BatchEncoding({k: _to_framework(v, kind) for k, v in res.items()})

    # ---- padding (HF collators) ----------------------------------------------------------------
    def pad(
        self,
        encoded_inputs: Any,
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Pad encoded rows to one length, as ``transformers.PreTrainedTokenizerBase.pad`` (what HF's data
        collators call).

        ``encoded_inputs``: one encoding (a dict of id lists), a dict of batched lists, or a list of such
        dicts (``datasets`` rows). ``input_ids``, ``attention_mask`` (created when missing),
        ``token_type_ids`` and ``special_tokens_mask`` are padded; other keys (``labels``) are passed through.
        Tensor or array inputs come back as the same kind unless ``return_tensors`` says otherwise.
        """
        del verbose
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            encoded_inputs = {key: [row[key] for row in encoded_inputs] for key in encoded_inputs[0].keys()}
        main = self.model_input_names[0]
        if not isinstance(encoded_inputs, Mapping) or main not in encoded_inputs:
            keys = list(encoded_inputs.keys()) if isinstance(encoded_inputs, Mapping) else type(encoded_inputs).__name__
            raise ValueError("You should supply an encoding or a list of encodings to this method "
                             f"that includes {main}, but you provided {keys}")
        encoded = dict(encoded_inputs)
        if padding_side is not None and padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        required = encoded[main]
        if required is None or (isinstance(required, Sized) and len(required) == 0):
            if return_attention_mask:
                encoded["attention_mask"] = []
            return BatchEncoding(encoded)
        first = required[0]
        if isinstance(first, (list, tuple)):
            first = next((row[0] for row in required if len(row)), first)
        if not isinstance(first, (int, list, tuple)):
            if type(first).__module__.startswith("torch"):
                return_tensors = "pt" if return_tensors is None else return_tensors
            elif isinstance(first, (np.ndarray, np.generic)):
                return_tensors = "np" if return_tensors is None else return_tensors
            elif type(first).__module__.startswith("tensorflow"):
                return_tensors = "tf" if return_tensors is None else return_tensors
            else:
                raise ValueError(f"{main}: element of unknown type {type(first).__name__}; expected python ints, "
                                 "numpy arrays or torch tensors")
            encoded = {k: _to_py(v) for k, v in encoded.items()}
        pad, _, max_length = self._strategies(padding, False, max_length, pad_to_multiple_of)
        required = encoded[main]
        if required and not isinstance(required[0], (list, tuple)):
            return _convert(self._pad_one(encoded, pad, max_length, pad_to_multiple_of, padding_side,
                                          return_attention_mask), return_tensors)
        B = len(required)
        for key, value in encoded.items():
            if len(value) != B:
                raise ValueError(f"{key!r} has {len(value)} rows, {main!r} has {B}")
        if pad == "longest":
            max_length = max(len(row) for row in required)
            pad = "max_length"
        batch: dict[str, list] = {}
        for i in range(B):
            row = self._pad_one({k: v[i] for k, v in encoded.items()}, pad, max_length, pad_to_multiple_of,
                                padding_side, return_attention_mask)
            for key, value in row.items():
                batch.setdefault(key, []).append(value)
        return _convert(batch, return_tensors)

    def _pad_one(self, row: dict[str, Any], pad: str, max_length: int | None, pad_to_multiple_of: int | None,
                 padding_side: str | None, return_attention_mask: bool | None) -> dict[str, Any]:
        """One encoding's lists padded to ``max_length`` (HF's ``_pad``)."""
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        main = self.model_input_names[0]
        ids = list(row[main])
        if pad == "longest":
            max_length = len(ids)
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        if return_attention_mask and "attention_mask" not in row:
            row["attention_mask"] = [1] * len(ids)
        extra = (max_length - len(ids)) if pad != "do_not_pad" and max_length is not None else 0
        if extra > 0:
            left = (padding_side or self.padding_side) == "left"
            fills = {main: self.pad_token_id, "token_type_ids": self.pad_token_type_id, "special_tokens_mask": 1}
            if return_attention_mask:
                fills["attention_mask"] = 0
            for key, value in fills.items():
                if key in row:
                    cur = list(row[key])
                    row[key] = [value] * extra + cur if left else cur + [value] * extra
        return row

    # ---- decoding ------------------------------------------------------------------------------
    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Tokens joined by single spaces, as HF (``"<cls> M K <eos>"``)."""
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        text = tokens if isinstance(tokens, str) else " ".join(tokens)
        return _clean_up(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        if hasattr(sequences, "tolist") and not isinstance(sequences, list):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # ---- files ---------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None
                        ) -> tuple[str]:
        """Write ``[prefix-]vocab.txt`` (tokens joined by newlines, as HF) into ``save_directory``."""
        path = os.path.join(os.fspath(save_directory), (filename_prefix + "-" if filename_prefix else "")
                            + VOCAB_FILE_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.all_tokens))
        return (path,)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write ``vocab.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (HF-loadable)."""
        d = os.fspath(save_directory)
        if os.path.isfile(d):
            raise ValueError(f"{d} is a file, expected a directory")
        os.makedirs(d, exist_ok=True)
        special_ids = sorted(self._tok2id[t] for t in set(self.all_special_tokens))
        cfg: dict[str, Any] = {
            "added_tokens_decoder": {
                str(i): {"content": self._id2tok[i], "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True} for i in special_ids},
            "model_max_length": self.model_max_length,
            "tokenizer_class": "EsmTokenizer",
        }
        cfg.update({a: self._special[a] for a in sorted(_SPECIAL_ATTRS)})
        cfg_path = os.path.join(d, TOKENIZER_CONFIG_NAME)
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        map_path = os.path.join(d, SPECIAL_TOKENS_MAP_NAME)
        with open(map_path, "w", encoding="utf-8") as f:
            json.dump({a: self._special[a] for a in sorted(_SPECIAL_ATTRS)}, f, indent=2)
            f.write("\n")
        return (cfg_path, map_path) + self.save_vocabulary(d)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
        """Upload the tokenizer files (``save_pretrained``'s) to the HF hub through ``huggingface_hub``."""
        from .hf_hub import push_folder_to_hub

        return push_folder_to_hub(self.save_pretrained, repo_id, commit_message=commit_message, private=private,
                                  token=token, revision=revision, create_pr=create_pr, what="tokenizer")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> EsmTokenizer:
        """Load from a directory holding ``vocab.txt``, a ``vocab.txt`` file, or a preset name / hub id.

        transformers' hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``,
        ``force_download``, ``subfolder``, ``proxies``) are passed to huggingface_hub; other keyword arguments
        are the constructor's (``strict``, ``model_max_length``, special tokens ...)."""
        from .hf_hub import HUB_ARGS, NO_OP_ARGS

        hub = {k: kwargs.pop(k) for k in HUB_ARGS if k in kwargs}
        hub = {k: v for k, v in hub.items() if v is not None}
        for k in NO_OP_ARGS:
            kwargs.pop(k, None)
        path = os.fspath(name_or_path)
        if not os.path.exists(path) or hub.get("subfolder"):
            from ..io.resolve import resolve_checkpoint

            path = os.fspath(resolve_checkpoint(path, **hub))
        if os.path.isfile(path):
            return cls(path, **kwargs)
        vocab = os.path.join(path, VOCAB_FILE_NAME)
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"no {VOCAB_FILE_NAME} in {path}")
        opts: dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_MAP_NAME, TOKENIZER_CONFIG_NAME):  # tokenizer_config.json wins
            p = os.path.join(path, name)
            if not os.path.isfile(p):
                continue
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
            for a in _SPECIAL_ATTRS:
                v = data.get(a)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str):
                    opts[a] = v
            mml = data.get("model_max_length")
            if isinstance(mml, (int, float)) and not isinstance(mml, bool):
                opts["model_max_length"] = int(mml)
        opts.update(kwargs)
        return cls(vocab, **opts)

    def __repr__(self) -> str:
        return (f"EsmTokenizer(vocab_size={self.vocab_size}, strict={self.strict}, "
                f"model_max_length={self.model_max_length})")


def load_vocab_file(path: str | os.PathLike) -> list[str]:
    """Tokens of a ``vocab.txt``: one per line, surrounding whitespace stripped (as HF)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()]


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


def check_pad_to_multiple_of(value: Any) -> None:
    """``pad_to_multiple_of`` must be None or a positive integer (0 would divide by zero)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {value!r}")


def _to_py(value: Any) -> Any:
    """Tensors and arrays (or lists of them) as python lists, as HF's ``to_py_obj``."""
    if hasattr(value, "tolist") and not isinstance(value, list):
        return value.tolist()
    if hasattr(value, "numpy") and not isinstance(value, list):
        return value.numpy().tolist()
    if isinstance(value, (list, tuple)):
        return [_to_py(v) for v in value]
    return value


def _convert(data: dict[str, Any], return_tensors: Any) -> BatchEncoding:
    """HF's ``BatchEncoding(data, tensor_type=...)``: python lists, or every value as np/pt/tf."""
    if return_tensors is None:
        return BatchEncoding(data)
    kind = str(getattr(return_tensors, "value", return_tensors))
    if kind not in ("np", "pt", "tf"):
        raise ValueError(f"return_tensors must be None, 'np', 'pt' or 'tf', got {return_tensors!r}")
    out = {}
    for key, value in data.items():
        try:
            arr = np.asarray(value)
        except ValueError:
            arr = None
        if arr is None or arr.dtype == object:
            raise ValueError(
                "Unable to create tensor, you should probably activate truncation and/or padding with "
                f"'padding=True' 'truncation=True' to have batched tensors with the same length (`{key}` has rows "
                "of different lengths).")
        if arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        elif arr.dtype == np.float64 and kind == "pt":
            arr = arr.astype(np.float32)  # torch.tensor of python floats gives float32
        out[key] = _to_framework(arr, kind) if arr.dtype.kind in "iub" or kind != "tf" else _tf_float(arr)
    return BatchEncoding(out)


def _tf_float(arr: np.ndarray) -> Any:
    import tensorflow as tf

    return tf.convert_to_tensor(arr.astype(np.float32))


def _to_framework(arr: np.ndarray, kind: str) -> Any:
    if kind == "np":
        return arr
    if arr.dtype == object:
        raise ValueError("Unable to create tensor from rows of different lengths; use padding=True")
    if kind == "pt":
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr))
    import tensorflow as tf

    return tf.convert_to_tensor(arr.astype(np.int32))


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
