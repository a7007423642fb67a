"""The tokenizer's output: ``BatchEncoding``, and the numpy work behind it on ragged rows.

Token rows of a batch are held as one flat int64 array plus offsets [B + 1] (row ``i`` is
``flat[off[i]:off[i + 1]]``). :func:`assemble` truncates them and adds ``<cls>``/``<eos>``, :func:`pad_rows` pads
them to one length and returns python lists or np/pt/tf tensors, :func:`convert_to_tensors` is HF's
``BatchEncoding(data, tensor_type=...)`` for already padded lists (``tokenizer.pad``).

numpy only: "pt"/"tf" import torch/TensorFlow inside the call.
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np


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



def ragged_positions(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ragged rows of ``lengths``: (row of every element, position of every element in its row)."""
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return rows, np.arange(total) - np.repeat(starts, lengths)


def _keep_mask(n: np.ndarray, k: np.ndarray, left: bool) -> np.ndarray:
    """Over ragged rows of lengths ``n``: True for the first (or, ``left``, the last) ``k`` of each row."""
    rows, pos = ragged_positions(n)
    return pos >= (n - k)[rows] if left else pos < k[rows]


def split_rows(flat: np.ndarray, off: np.ndarray) -> list[np.ndarray]:
    """The rows of a flat array with offsets ``off`` [B + 1], as views."""
    b = off.tolist()
    return [flat[b[i]:b[i + 1]] for i in range(len(b) - 1)]


def row_offsets(lengths: np.ndarray) -> np.ndarray:
    """Offsets [B + 1] of ragged rows of ``lengths`` in one flat array."""
    off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=off[1:])
    return off



def assemble(
    flat0: np.ndarray,
    off0: np.ndarray,
    flat1: np.ndarray | None,
    off1: np.ndarray | None,
    add_special_tokens: bool,
    trunc: str,
    max_length: int | None,
    *,
    cls_token_id: int,
    eos_token_id: int,
    truncation_side: str = "right",
    return_token_type_ids: bool = False,
    return_special_tokens_mask: bool = False,
) -> dict[str, np.ndarray]:
    """Truncate and add special tokens to ragged rows; flat arrays + ``offsets`` of the rows.

    ``flat0``/``off0``: residue ids of the first sequences (flat int64) and their offsets [B + 1]; ``flat1``/
    ``off1`` the same for the second sequences of pairs, or None. ``trunc`` is HF's truncation strategy
    (``"longest_first"``, ``"only_first"``, ``"only_second"``, ``"do_not_truncate"``). Rows are laid out as
    ``<cls> seq0 <eos> [seq1 <eos>]``."""
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
    left = truncation_side == "left"
    total = k0 + k1 + ns
    out_off = row_offsets(total)
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
        rows, pos = ragged_positions(k0)
        src = off0[:-1][rows] + pos + ((n0 - k0)[rows] if left else 0)
        input_ids[starts[rows] + s0 + pos] = flat0[src]
        s1 = s0 + k0 + (1 if add_special_tokens else 0)  # where seq1 starts in each row
        rows, pos = ragged_positions(k1)
        src = off1[:-1][rows] + pos + ((n1 - k1)[rows] if left else 0)
        dst = out_off[:-1][rows] + s1[rows] + pos
        input_ids[dst] = flat1[src]
        if type_ids is not None and add_special_tokens:
            type_ids[dst] = 1
            type_ids[out_off[1:] - 1] = 1
    if add_special_tokens:
        input_ids[starts] = cls_token_id
        input_ids[starts + 1 + k0] = eos_token_id
        special[starts] = 1
        special[starts + 1 + k0] = 1
        if pair:
            input_ids[out_off[1:] - 1] = eos_token_id
            special[out_off[1:] - 1] = 1
    out = {"input_ids": input_ids}
    if type_ids is not None:
        out["token_type_ids"] = type_ids
    if return_special_tokens_mask:
        out["special_tokens_mask"] = special
    out["offsets"] = out_off
    return out


def pad_rows(
    enc: dict[str, np.ndarray],
    pad: str,
    max_length: int | None,
    pad_to_multiple_of: int | None,
    padding_side: str,
    return_attention_mask: bool,
    return_tensors: str | None,
    return_length: bool,
    batched: bool,
    *,
    pad_token_id: int,
    pad_token_type_id: int = 0,
) -> BatchEncoding:
    """:func:`assemble`'s ragged rows padded (HF's padding strategy ``pad``) and returned as python lists or
    np/pt/tf tensors; ``batched=False`` drops the batch axis of python lists, as HF for one sequence."""
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
    pad_values = {"input_ids": pad_token_id, "token_type_ids": pad_token_type_id,
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
    return BatchEncoding({k: to_framework(v, kind) for k, v in res.items()})



def to_py(value: Any) -> Any:
    """Tensors and arrays (or lists of them) as python lists, as HF's ``to_py_obj``."""
    if hasattr(value, "tolist") and not isinstance(value, list):
        return value.tolist()
    if hasattr(value, "numpy") and not isinstance(value, list):
        return value.numpy().tolist()
    if isinstance(value, (list, tuple)):
        return [to_py(v) for v in value]
    return value


def convert_to_tensors(data: dict[str, Any], return_tensors: Any) -> BatchEncoding:
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
        out[key] = to_framework(arr, kind) if arr.dtype.kind in "iub" or kind != "tf" else _tf_float(arr)
    return BatchEncoding(out)


def _tf_float(arr: np.ndarray) -> Any:
    import tensorflow as tf

    return tf.convert_to_tensor(arr.astype(np.float32))


def to_framework(arr: np.ndarray, kind: str) -> Any:
    """An int array as "np" (itself), "pt" (int64) or "tf" (int32)."""
    if kind == "np":
        return arr
    if arr.dtype == object:
        raise ValueError("Unable to create tensor from rows of different lengths; use padding=True")
    if kind == "pt":
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr))
    import tensorflow as tf

    return tf.convert_to_tensor(arr.astype(np.int32))


__all__ = ["BatchEncoding", "assemble", "convert_to_tensors", "pad_rows", "ragged_positions",
           "row_offsets", "split_rows", "to_framework", "to_py"]
