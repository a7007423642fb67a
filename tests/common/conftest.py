"""Fixtures of the tokenizer tests (test_tokenizer.py, test_tokenizer_hf.py): the ESM ``vocab.txt``, our tokenizer
and transformers' on it."""

from __future__ import annotations

import pytest

from esm_dual.common.config import DEFAULT_VOCAB
from esm_dual.common.tokenizer import EsmTokenizer


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(DEFAULT_VOCAB), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def hf(vocab_file):
    transformers = pytest.importorskip("transformers")
    return transformers.EsmTokenizer(vocab_file)


@pytest.fixture(scope="module")
def tok(vocab_file) -> EsmTokenizer:
    return EsmTokenizer(vocab_file)
