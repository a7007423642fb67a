"""End to end on real data: fine-tune TFEsmForSequenceClassification on beta-lactamase fitness with Keras
``fit`` (the model's own loss), save in the hub layout, reload in PyTorch and compare predictions.

P62593.fasta holds 5,397 single-mutant variants of TEM-1 beta-lactamase (286 residues each), header
``>index|beta-lactamase_<WT><pos><MT>|<fitness>``. A tiny random ESM-2 cannot learn single-residue
effects in a few epochs on two CPU cores; it does learn the level of the fitness values, which is what
makes the training loss fall here. The fitness is used in its own units (mean 0.75, sd 0.32: already of
order one). Standardising it (z-scores) would make the fresh head's near-zero output the best constant
prediction from the start, and the loss of a tiny model could not fall.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

from esm_dual.common.fasta import read_fasta  # noqa: E402
from esm_dual.common.tokenizer import EsmTokenizer  # noqa: E402
from esm_dual.tf.data import make_dataset  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.utils import write_hub_checkpoint  # noqa: E402

N_TRAIN, N_TEST, EPOCHS = 256, 48, 4


def _fitness(record) -> float:
    return float(record.description.split("|")[-1])


def test_fit_regression_then_pytorch_agrees(tmp_path, data_dir):
    from esm_dual.pt import EsmForSequenceClassification
    from esm_dual.tf import TFEsmForSequenceClassification

    records = list(read_fasta(os.path.join(data_dir, "P62593.fasta")))
    assert len(records) == 5397 and {len(r.sequence) for r in records} == {286}
    assert records[0].description.split("|")[1].startswith("beta-lactamase_")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(records), N_TRAIN + N_TEST, replace=False)
    seqs = [records[i].sequence for i in pick]
    fitness = np.array([_fitness(records[i]) for i in pick], np.float32)
    y = fitness  # natural units (see the module docstring)
    train_seqs, y_train = seqs[:N_TRAIN], y[:N_TRAIN]
    test_seqs = seqs[N_TRAIN:]

    init_dir = str(tmp_path / "init")
    write_hub_checkpoint(init_dir, tiny_config("esm2"), head="base")
    keras.utils.set_random_seed(0)
    model = TFEsmForSequenceClassification.from_pretrained(init_dir, num_labels=1, problem_type="regression")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))  # no loss: the model's own MSE
    train = make_dataset(train_seqs, y_train, batch_size=32, shuffle=True, seed=0)
    history = model.fit(train, epochs=EPOCHS, verbose=0, shuffle=False)  # make_dataset shuffles
    losses = history.history["loss"]
    assert len(losses) == EPOCHS and all(np.isfinite(losses))
    # Falls by a wide margin (observed: about 0.6 -> 0.2; the fitness variance is 0.1).
    assert losses[-1] < 0.6 * losses[0], losses

    # The loss Keras reports is the model's own regression loss: MSE of the logits on these labels.
    ds_eval = make_dataset(train_seqs, y_train, batch_size=64)
    sq, n = 0.0, 0
    for xb, yb in ds_eval:
        pred = model(xb, training=False).logits.numpy()[:, 0]
        sq += float(((pred - yb.numpy()) ** 2).sum())
        n += len(pred)
    assert sq / n < losses[0]

    # Save in the hub layout and reload in PyTorch.
    out_dir = str(tmp_path / "tuned")
    model.save_pretrained(out_dir)
    assert os.path.isfile(os.path.join(out_dir, "config.json"))
    pt_model = EsmForSequenceClassification.from_pretrained(out_dir)
    assert pt_model.config.num_labels == 1 and pt_model.config.problem_type == "regression"

    # Held-out variants: the two frameworks agree within 1e-4.
    enc = EsmTokenizer()(test_seqs, padding=True, return_tensors="np")
    tf_pred = model({"input_ids": enc["input_ids"].astype(np.int32),
                     "attention_mask": enc["attention_mask"].astype(np.int32)}, training=False).logits.numpy()
    with torch.no_grad():
        pt_pred = pt_model(torch.from_numpy(enc["input_ids"]),
                           attention_mask=torch.from_numpy(enc["attention_mask"])).logits.numpy()
    assert tf_pred.shape == pt_pred.shape == (N_TEST, 1)
    np.testing.assert_allclose(pt_pred, tf_pred, atol=1e-4, rtol=0)
    # The predictions are not a constant: the encoder reads the variants.
    assert np.ptp(tf_pred) > 0
    # And the fine-tuned model predicts the fitness level, not the fresh head's near-zero output.
    assert abs(float(tf_pred.mean()) - float(y[N_TRAIN:].mean())) < 0.5 * float(y[N_TRAIN:].mean())
