"""The tokenizer's vocabulary: the ``vocab.txt`` file, HF's order of special tokens, and HF's added-token trie.

``split_on_tokens`` is a step-for-step re-implementation of ``transformers``' ``Trie.split``: it cuts a text
around every vocabulary entry found in it (first completed match wins, extended to the longest match among
partial matches that began at or before it), so that custom vocabularies tokenize as in HF too.
``EsmTokenizer`` (``common.tokenizer``) builds on it. numpy-free, framework-free.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

VOCAB_FILE_NAME = "vocab.txt"

# HF's order of the special-token attributes (``all_special_tokens`` and appending missing ones).
SPECIAL_ATTRS = ("eos_token", "unk_token", "pad_token", "cls_token", "mask_token")

_END = ""  # key marking the end of a token in the trie (text characters are never "")


def load_vocab_file(path: str | os.PathLike) -> list[str]:
    """Tokens of a ``vocab.txt``: one per line, surrounding whitespace stripped (as HF)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()]


def build_trie(tokens: Iterable[str]) -> dict:
    """The tokens as a character trie (nested dicts; a token's last node holds the end marker)."""
    root: dict = {}
    for tok in tokens:
        if not tok:
            continue
        node = root
        for ch in tok:
            node = node.setdefault(ch, {})
        node[_END] = 1
    return root


def split_on_tokens(root: dict, text: str) -> list[tuple[int, str]]:
    """HF's ``Trie.split``: cut ``text`` around the tokens of the trie ``root``; (offset, piece) pairs."""
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


__all__ = ["SPECIAL_ATTRS", "VOCAB_FILE_NAME", "build_trie", "load_vocab_file", "split_on_tokens"]
