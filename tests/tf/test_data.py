"""esm_dual.tf.data: bucketed per-batch padding, token budgets, labels, FASTA input and MLM masking."""

from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from esm_dual.common.tokenizer import EsmTokenizer  # noqa: E402
from esm_dual.tf.data import (  # noqa: E402
    DEFAULT_BUCKET_BOUNDARIES,
    bucket_lengths,
    encode_sequences,
    make_dataset,
    mlm_mask,
)
from tests.utils import AMINO_ACIDS, random_sequences  # noqa: E402

SPECIAL = (0, 1, 2, 3, 32)
MASK, PAD, CLS, EOS = 32, 1, 0, 2


def collect(ds):
    """All batches as numpy: list of (input_ids, attention_mask, labels-or-None)."""
    out = []
    for elem in ds:
        if isinstance(elem, dict):
            x, y = elem, None
        else:
            x, y = elem
            y = y.numpy()
        out.append((x["input_ids"].numpy(), x["attention_mask"].numpy(), y))
    return out


@pytest.fixture(scope="module")
def tok():
    return EsmTokenizer()


@pytest.fixture(scope="module")
def seqs():
    return random_sequences(200, 1, 700, seed=1)


# ------------------------------------------------------------------------------------------------
# Shapes, padding, bucketing
# ------------------------------------------------------------------------------------------------


def test_shapes_and_dtypes(seqs):
    y = np.linspace(-1, 1, len(seqs))
    batches = collect(make_dataset(seqs, y, batch_size=16))
    assert sum(b[0].shape[0] for b in batches) == len(seqs)
    for ids, mask, lab in batches:
        assert ids.dtype == np.int32 and mask.dtype == np.int32
        assert ids.ndim == 2 and ids.shape == mask.shape
        assert 1 <= ids.shape[0] <= 16
        assert lab.dtype == np.float32 and lab.shape == (ids.shape[0],)


def test_element_spec_is_keras_ready(seqs):
    ds = make_dataset(seqs[:10], np.arange(10), batch_size=4)
    x_spec, y_spec = ds.element_spec
    assert set(x_spec) == {"input_ids", "attention_mask"}
    assert x_spec["input_ids"].dtype == tf.int32 and x_spec["input_ids"].shape.rank == 2
    assert y_spec.dtype == tf.int32  # integer labels stay integers (classification)
    ds = make_dataset(seqs[:10], batch_size=4)  # no labels: the input dict alone
    assert set(ds.element_spec) == {"input_ids", "attention_mask"}


def test_padding_is_per_batch_to_the_bucket(seqs):
    lengths = [len(s) + 2 for s in seqs]
    buckets = bucket_lengths(max(lengths))
    batches = collect(make_dataset(seqs, np.arange(len(seqs)), batch_size=8))
    widths = set()
    for ids, mask, idx in batches:
        real = mask.sum(1)
        # The batch is padded to the smallest bucket that holds its longest sequence, not a global max.
        L = ids.shape[1]
        assert L == min(b for b in buckets if b >= real.max())
        widths.add(L)
        for r in range(ids.shape[0]):
            n = real[r]
            assert n == lengths[idx[r]]
            assert mask[r, :n].all() and not mask[r, n:].any()
            assert ids[r, 0] == CLS and ids[r, n - 1] == EOS
            assert (ids[r, n:] == PAD).all()
            assert not np.isin(ids[r, 1:n - 1], SPECIAL).any()
    assert len(widths) > 3
    assert min(widths) < max(lengths) // 2  # short batches really are short


def test_bucketing_limits_distinct_shapes():
    seqs = random_sequences(600, 1, 1200, seed=2)  # some longer than the 1022-residue truncation
    ds = make_dataset(seqs, batch_size=4)
    widths = {b[0].shape[1] for b in collect(ds)}
    assert widths <= set(DEFAULT_BUCKET_BOUNDARIES)
    assert len(widths) <= len(DEFAULT_BUCKET_BOUNDARIES)
    assert all(w % 8 == 0 for w in widths)
    assert max(widths) == 1024  # 1022 residues + BOS/EOS


def test_bucket_lengths_rounding():
    # Multiples of 8 up to 64, of 64 above; the top bucket is the data's maximum rounded up to 8.
    assert bucket_lengths(1000, [10, 50, 100, 300, 2000]) == [16, 56, 128, 320, 1000]
    assert bucket_lengths(290) == [16, 32, 64, 128, 192, 256, 296]
    assert bucket_lengths(288) == [16, 32, 64, 128, 192, 256, 288]
    assert bucket_lengths(1024) == list(DEFAULT_BUCKET_BOUNDARIES)
    assert bucket_lengths(1020) == list(DEFAULT_BUCKET_BOUNDARIES)  # 1024 is within 8 of 1020
    assert bucket_lengths(5, [64, 128]) == [8]


def test_user_bucket_boundaries(seqs):
    ds = make_dataset(seqs, batch_size=8, bucket_boundaries=[100, 300])
    widths = {b[0].shape[1] for b in collect(ds)}
    top = -(-(max(len(s) for s in seqs) + 2) // 8) * 8  # the longest sequence rounded up to 8
    assert widths == {128, 320, top}


def test_token_budget(seqs):
    budget = 3000
    batches = collect(make_dataset(seqs, np.arange(len(seqs)), max_tokens=budget))
    seen = np.concatenate([b[2] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(seqs)))  # every sequence exactly once
    per_width: dict[int, list[int]] = {}
    for ids, _, _ in batches:
        B, L = ids.shape
        assert B * L <= budget
        per_width.setdefault(L, []).append(B)
    for L, sizes in per_width.items():
        # Every batch of a bucket but its last is full.
        assert all(b == budget // L for b in sizes[:-1]) and sizes[-1] <= budget // L
    # A bucket longer than the budget still gets one sequence per batch.
    long_batches = collect(make_dataset(seqs, max_tokens=300))
    assert all(ids.shape[0] == 1 for ids, _, _ in long_batches if ids.shape[1] > 300)
    # batch_size caps the token-budget batch size.
    capped = collect(make_dataset(seqs, max_tokens=budget, batch_size=5))
    assert max(ids.shape[0] for ids, _, _ in capped) == 5


def test_drop_remainder(seqs):
    batches = collect(make_dataset(seqs, batch_size=8, drop_remainder=True))
    assert batches and all(ids.shape[0] == 8 for ids, _, _ in batches)


@pytest.mark.parametrize("kwargs", [dict(batch_size=8), dict(batch_size=8, drop_remainder=True),
                                    dict(max_tokens=2000), dict(max_tokens=2000, mlm=True, shuffle=True)])
def test_cardinality_is_known_and_exact(seqs, kwargs):
    """Keras reads the steps per epoch from the cardinality; it must equal the real batch count."""
    ds = make_dataset(seqs, **kwargs)
    assert int(ds.cardinality()) == len(collect(ds)) > 0


def test_truncation(tok):
    seq = "".join(AMINO_ACIDS[np.arange(50) % 20])
    with pytest.warns(UserWarning, match=r"1 sequence\(s\) longer than 10 residues truncated .*#0"):
        (ids, mask, lab), = collect(make_dataset([seq], [1.5], truncation_length=10, batch_size=1))
    assert mask.sum() == 12
    expected = tok([seq[:10]], return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(ids[0, :12], expected)
    assert ids[0, 11] == EOS
    # Token labels are truncated with their residues.
    with pytest.warns(UserWarning, match="truncated"):
        (ids, mask, lab), = collect(make_dataset([seq], [np.arange(50)], label_type="token",
                                                 truncation_length=10, batch_size=1))
    np.testing.assert_array_equal(lab[0, :12], [-100, *range(10), -100])
    assert (lab[0, 12:] == -100).all()
    # No truncation.
    (ids, mask, _), = collect(make_dataset([seq], truncation_length=None, batch_size=1))
    assert mask.sum() == 52


def test_characters_outside_the_vocabulary(tmp_path):
    from esm_dual.common.fasta import FastaRecord
    from esm_dual.common.tokenizer import TokenizerError

    fasta = tmp_path / "x.fa"
    fasta.write_text(">good\nMKTAYIAK\n>bad_rec\nMKT1AYIAK\n")
    with pytest.raises(TokenizerError, match=r"'bad_rec'.*'1' at position 4"):
        make_dataset(str(fasta), batch_size=2)
    with pytest.raises(TokenizerError, match=r"record 1: invalid character 'm' at position 1"):
        make_dataset(["MKTA", "mkta"], batch_size=2)  # lower-case would collapse into one <unk>
    with pytest.raises(TokenizerError, match="'r2'"):
        make_dataset([FastaRecord("r1", "r1", "MKT"), FastaRecord("r2", "r2", "MK*")], batch_size=2)
    with pytest.raises(TokenizerError):
        encode_sequences(["MK*"])
    # strict=False: HF's tokenizer behaviour (a run of unknown characters is one <unk>)
    (ids, mask, _), = collect(make_dataset(["MKTA", "mkta"], batch_size=2, strict=False))
    assert mask.sum(1).tolist() == [6, 3] and ids[1, 1] == 3  # <cls> <unk> <eos>
    np.testing.assert_array_equal(encode_sequences(["AC*D"], strict=False)[0], [0, 5, 23, 3, 13, 2])


def test_round_trip_matches_tokenizer(tok, seqs):
    """Each row (found by its sequence-index label, after shuffling) is the tokenizer's encoding."""
    batches = collect(make_dataset(seqs, np.arange(len(seqs)), max_tokens=4096, shuffle=True, seed=3))
    seen = 0
    for ids, mask, idx in batches:
        for r in range(ids.shape[0]):
            s = seqs[idx[r]]
            expected = tok([s], return_tensors="np")["input_ids"][0]
            np.testing.assert_array_equal(ids[r, : mask[r].sum()], expected)
            seen += 1
    assert seen == len(seqs)
    for a, s in zip(encode_sequences(seqs[:5], tok), seqs[:5]):
        np.testing.assert_array_equal(a, tok([s], return_tensors="np")["input_ids"][0])


def test_token_labels_alignment(tok, seqs):
    # Per-residue label = the residue's own token id, so every label must sit on its residue.
    residue_ids = [tok([s], return_tensors="np")["input_ids"][0][1:-1] for s in seqs]
    batches = collect(make_dataset(seqs, residue_ids, label_type="token", batch_size=8, shuffle=True))
    n_labels = 0
    for ids, mask, lab in batches:
        assert lab.shape == ids.shape and lab.dtype == np.int32
        real = lab != -100
        np.testing.assert_array_equal(lab[real], ids[real])
        # BOS, EOS and padding carry -100; every residue carries a label.
        np.testing.assert_array_equal(real, mask.astype(bool) & ~np.isin(ids, (CLS, EOS)))
        n_labels += real.sum()
    assert n_labels == sum(len(s) for s in seqs)
    # Float per-residue targets keep their dtype and are padded with -100 too.
    floats = [np.linspace(0, 1, len(s)) for s in seqs[:6]]
    for _, mask, lab in collect(make_dataset(seqs[:6], floats, label_type="token", batch_size=3)):
        assert lab.dtype == np.float32
        assert (lab[mask == 0] == -100).all() and (lab[:, 0] == -100).all()


def test_multi_output_sequence_labels(seqs):
    y = np.stack([np.arange(len(seqs)), -np.arange(len(seqs))], 1).astype(np.float32)
    for _, _, lab in collect(make_dataset(seqs, y, batch_size=7, shuffle=True)):
        assert lab.shape[1] == 2
        np.testing.assert_array_equal(lab[:, 1], -lab[:, 0])


def test_fasta_path_input(tmp_path, data_dir, tok):
    from esm_dual.common.fasta import read_fasta

    path = os.path.join(data_dir, "some_proteins.fasta")
    records = list(read_fasta(path))
    batches = collect(make_dataset(path, batch_size=4))
    got = sorted(tuple(ids[r, : mask[r].sum()].tolist()) for ids, mask, _ in batches
                 for r in range(ids.shape[0]))
    want = sorted(tuple(tok([r.sequence], return_tensors="np")["input_ids"][0].tolist()) for r in records)
    assert got == want
    # Labels from the headers through a callable, on a FASTA file written here.
    fasta = tmp_path / "lab.fasta"
    fasta.write_text(">a|0.5\nMKTAY\nIAK\n>b|-2.0\nMKV\n>c|3.25\nACDEFGHIK\n")
    batches = collect(make_dataset(str(fasta), lambda rec: float(rec.id.split("|")[-1]), batch_size=8))
    (ids, mask, lab), = batches
    by_len = {int(m.sum()): float(v) for m, v in zip(mask, lab)}
    assert by_len == {10: 0.5, 5: -2.0, 11: 3.25}
    with pytest.raises(FileNotFoundError):
        make_dataset(str(tmp_path / "missing.fasta"))


def test_shuffle_is_seeded_and_reshuffles(seqs):
    def order(ds):
        return [tuple(b[2].tolist()) for b in collect(ds)]

    ds = make_dataset(seqs, np.arange(len(seqs)), batch_size=8, shuffle=True, seed=7)
    e1, e2 = order(ds), order(ds)
    assert e1 != e2  # a new order every epoch
    assert sorted(sum(e1, ())) == sorted(sum(e2, ())) == list(range(len(seqs)))
    again = make_dataset(seqs, np.arange(len(seqs)), batch_size=8, shuffle=True, seed=7)
    assert order(again) == e1  # same seed, same order
    assert order(make_dataset(seqs, np.arange(len(seqs)), batch_size=8, shuffle=True, seed=8)) != e1
    plain = order(make_dataset(seqs, np.arange(len(seqs)), batch_size=8))
    assert plain == order(make_dataset(seqs, np.arange(len(seqs)), batch_size=8))


def test_errors(seqs):
    with pytest.raises(ValueError, match="labels"):
        make_dataset(seqs, np.arange(3))
    with pytest.raises(ValueError, match="per residue"):
        make_dataset(seqs[:2], [np.arange(len(seqs[0])), np.arange(3)], label_type="token")
    with pytest.raises(ValueError, match="mlm"):
        make_dataset(seqs, np.arange(len(seqs)), mlm=True)
    with pytest.raises(ValueError, match="label_type"):
        make_dataset(seqs, label_type="residue")
    with pytest.raises(ValueError, match="no sequences"):
        make_dataset([])
    with pytest.raises(TypeError):
        make_dataset([b"MKV"])


# ------------------------------------------------------------------------------------------------
# MLM masking
# ------------------------------------------------------------------------------------------------


def padded_batch(B: int = 64, L: int = 1024, seed: int = 0):
    """Random residues with BOS/EOS; half the rows padded to random shorter lengths; some <unk>/<mask>."""
    rng = np.random.default_rng(seed)
    ids = np.full((B, L), PAD, np.int32)
    mask = np.zeros((B, L), np.int32)
    for b in range(B):
        n = L if b % 2 == 0 else int(rng.integers(3, L))
        ids[b, 0], ids[b, n - 1] = CLS, EOS
        ids[b, 1 : n - 1] = rng.integers(4, 24, size=n - 2)
        mask[b, :n] = 1
    if L > 16:
        ids[2, 5], ids[4, 7] = 3, MASK  # <unk> and <mask> inside sequences are special too
    return ids, mask


def test_mlm_proportions():
    ids, mask = padded_batch()
    masked, labels = (t.numpy() for t in mlm_mask(ids, mask, tf.constant([1, 2], tf.int64)))
    eligible = (mask == 1) & ~np.isin(ids, SPECIAL)
    sel = labels != -100
    n_el, n_sel = eligible.sum(), sel.sum()
    assert n_el > 40_000
    # Binomial(n, 0.15): sd ~0.0017 at n ~ 45k; the tolerances are over 5 sd.
    assert abs(n_sel / n_el - 0.15) < 0.01
    to_mask = sel & (masked == MASK)
    changed = sel & (masked != MASK) & (masked != ids)
    kept = sel & (masked == ids)
    assert to_mask.sum() + changed.sum() + kept.sum() == n_sel
    # 80 / 10 / 10; a random replacement equals the original 1 time in 20, so "kept" is 10.5 %.
    assert abs(to_mask.sum() / n_sel - 0.8) < 0.03
    assert abs(changed.sum() / n_sel - 0.095) < 0.02
    assert abs(kept.sum() / n_sel - 0.105) < 0.02
    # Random replacements are standard amino acids, all 20 of them.
    assert set(np.unique(masked[changed])) == set(range(4, 24))


def test_mlm_never_selects_special_or_padding():
    ids, mask = padded_batch(B=32, L=256, seed=4)
    for s in range(5):
        masked, labels = (t.numpy() for t in mlm_mask(ids, mask, tf.constant([s, 9], tf.int64),
                                                      mlm_probability=0.5))
        protected = (mask == 0) | np.isin(ids, SPECIAL)
        assert (labels[protected] == -100).all()
        np.testing.assert_array_equal(masked[protected], ids[protected])


def test_mlm_labels_and_untouched_positions():
    ids, mask = padded_batch(B=16, L=300, seed=5)
    masked, labels = (t.numpy() for t in mlm_mask(ids, mask, tf.constant([3, 4], tf.int64)))
    sel = labels != -100
    np.testing.assert_array_equal(labels[sel], ids[sel])  # labels are the original ids
    np.testing.assert_array_equal(masked[~sel], ids[~sel])  # only selected positions change
    assert masked.dtype == ids.dtype and labels.dtype == ids.dtype


def test_mlm_every_sequence_gets_a_target():
    ids, mask = padded_batch(B=200, L=6, seed=6)  # at most 4 residues each
    for s in range(3):
        _, labels = mlm_mask(ids, mask, tf.constant([s, 0], tf.int64))
        assert ((labels.numpy() != -100).sum(1) >= 1).all()


def test_mlm_seeded_and_generator():
    ids, mask = padded_batch(B=8, L=200, seed=7)
    a = mlm_mask(ids, mask, tf.constant([1, 1], tf.int64))[1].numpy()
    b = mlm_mask(ids, mask, tf.constant([1, 1], tf.int64))[1].numpy()
    c = mlm_mask(ids, mask, tf.constant([1, 2], tf.int64))[1].numpy()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    g1, g2 = tf.random.Generator.from_seed(5), tf.random.Generator.from_seed(5)
    x1, x2 = mlm_mask(ids, mask, generator=g1)[1].numpy(), mlm_mask(ids, mask, g2)[1].numpy()
    np.testing.assert_array_equal(x1, x2)
    assert (mlm_mask(ids, mask, generator=g1)[1].numpy() != x1).any()  # the state advances
    with pytest.raises(ValueError):
        mlm_mask(ids, mask)


def test_mlm_dataset_new_masks_every_epoch(tok):
    seqs = random_sequences(40, 50, 400, seed=8)
    enc = {tuple(tok([s], return_tensors="np")["input_ids"][0].tolist()) for s in seqs}

    def epoch(ds):
        out = {}
        for ids, mask, labels in collect(ds):
            assert labels.shape == ids.shape and labels.dtype == np.int32
            assert ((mask == 0) <= (labels == -100)).all()
            # The original sequence: labels where selected, the input elsewhere.
            original = np.where(labels != -100, labels, ids)
            for r in range(ids.shape[0]):
                key = tuple(original[r, : mask[r].sum()].tolist())
                assert key in enc
                out[key] = labels[r, : mask[r].sum()].tolist()
        assert len(out) == len(seqs)
        return out

    ds = make_dataset(seqs, mlm=True, batch_size=8, seed=11)
    e1, e2 = epoch(ds), epoch(ds)
    assert sum(e1[k] != e2[k] for k in e1) == len(seqs)  # new masks for every sequence
    assert epoch(make_dataset(seqs, mlm=True, batch_size=8, seed=11)) == e1  # reproducible
    assert epoch(make_dataset(seqs, mlm=True, batch_size=8, seed=12)) != e1
    # Masks come out in the expected proportion through the pipeline as well.
    sel = sum(sum(v != -100 for v in labels) for labels in e1.values())
    assert abs(sel / sum(len(s) for s in seqs) - 0.15) < 0.03
