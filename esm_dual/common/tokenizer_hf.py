"""The HF-compatible surface of ``EsmTokenizer``: what transformers' collators, pipelines and scripts call.

``HFTokenizerMixin`` holds the parts of ``transformers.PreTrainedTokenizerBase`` that are not ESM encoding:
HF's padding/truncation strategies, ``pad`` (what ``DataCollatorWithPadding`` and
``DataCollatorForLanguageModeling`` call), the special-token helpers (``special_tokens_map``,
``build_inputs_with_special_tokens``, ``get_special_tokens_mask`` ...), ``batch_decode`` and the files:
``save_vocabulary``, ``save_pretrained`` (HF-loadable), ``from_pretrained`` (a directory, a ``vocab.txt``, a
preset name or hub id) and ``push_to_hub``.

It is mixed into ``EsmTokenizer`` (``common.tokenizer``), which provides the vocabulary (``all_tokens``,
``_special``, ``_tok2id``, ``_id2tok``), the special-token ids, ``model_max_length``, ``padding_side``,
``pad_token_type_id``, ``model_input_names`` and ``convert_ids_to_tokens``/``decode``.
numpy only; no torch or TensorFlow at import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sized
from typing import Any, TypeVar

import numpy as np

from .batch_encoding import BatchEncoding, convert_to_tensors, to_py
from .vocab import SPECIAL_ATTRS, VOCAB_FILE_NAME

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"

# HF's "no limit" model_max_length (int(1e30)) and the threshold above which it means "unset".
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

PADDINGS = ("longest", "max_length", "do_not_pad")
TRUNCATIONS = ("longest_first", "only_first", "only_second", "do_not_truncate")

T = TypeVar("T", bound="HFTokenizerMixin")


def check_pad_to_multiple_of(value: Any) -> None:
    """``pad_to_multiple_of`` must be None or a positive integer (0 would divide by zero)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {value!r}")


def _strategy(what: str, value: Any, on: str, off: str, allowed: tuple[str, ...]) -> str:
    """One HF strategy argument (``padding`` / ``truncation``) as its name: True -> ``on``, False/None ->
    ``off``, else a name (or an HF enum's ``.value``) out of ``allowed``."""
    if value is True:
        return on
    if value is False or value is None:
        return off
    name = str(getattr(value, "value", value))
    if name not in allowed:
        raise ValueError(f"{what} must be True, False or one of {allowed}, got {value!r}")
    return name


class HFTokenizerMixin:
    """HF's tokenizer surface over an ESM vocabulary (see the module docstring for what the class provides)."""

    # ---- special tokens ------------------------------------------------------------------------
    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special-token attributes that are set (HF's ``special_tokens_map``)."""
        return {a: self._special[a] for a in ("unk_token", "pad_token", "cls_token", "mask_token", "eos_token")
                if self._special[a]}

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

    # ---- strategies (__call__ and pad) ---------------------------------------------------------
    def _strategies(
        self, padding: Any, truncation: Any, max_length: int | None, pad_to_multiple_of: int | None
    ) -> tuple[str, str, int | None]:
        """HF's padding and truncation strategies of a call: (padding, truncation, max_length), checked."""
        check_pad_to_multiple_of(pad_to_multiple_of)
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
                                       or max_length < 0):
            raise ValueError(f"max_length must be a non-negative integer, got {max_length!r}")
        # HF: max_length alone (no padding, truncation unset) means truncation.
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        pad = _strategy("padding", padding, "longest", "do_not_pad", PADDINGS)
        trunc = _strategy("truncation", truncation, "longest_first", "do_not_truncate", TRUNCATIONS)
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
            encoded = {k: to_py(v) for k, v in encoded.items()}
        pad, _, max_length = self._strategies(padding, False, max_length, pad_to_multiple_of)
        required = encoded[main]
        if required and not isinstance(required[0], (list, tuple)):
            return convert_to_tensors(self._pad_one(encoded, pad, max_length, pad_to_multiple_of, padding_side,
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
        return convert_to_tensors(batch, return_tensors)

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
        cfg.update({a: self._special[a] for a in sorted(SPECIAL_ATTRS)})
        cfg_path = os.path.join(d, TOKENIZER_CONFIG_NAME)
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        map_path = os.path.join(d, SPECIAL_TOKENS_MAP_NAME)
        with open(map_path, "w", encoding="utf-8") as f:
            json.dump({a: self._special[a] for a in sorted(SPECIAL_ATTRS)}, f, indent=2)
            f.write("\n")
        return (cfg_path, map_path) + self.save_vocabulary(d)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
        """Upload the tokenizer files (``save_pretrained``'s) to the HF hub through ``huggingface_hub``."""
        from .hf_hub import push_folder_to_hub

        return push_folder_to_hub(self.save_pretrained, repo_id, commit_message=commit_message, private=private,
                                  token=token, revision=revision, create_pr=create_pr, what="tokenizer")

    @classmethod
    def from_pretrained(cls: type[T], name_or_path: str | os.PathLike, **kwargs: Any) -> T:
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
            for a in SPECIAL_ATTRS:
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


__all__ = ["HFTokenizerMixin", "LARGE_INTEGER", "SPECIAL_TOKENS_MAP_NAME", "TOKENIZER_CONFIG_NAME",
           "VERY_LARGE_INTEGER", "check_pad_to_multiple_of"]
