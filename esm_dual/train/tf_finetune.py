"""Fine-tune an ESM checkpoint with Keras ``fit`` under a ``tf.distribute`` strategy.

    # all local GPUs (or --cpu-devices N logical CPUs) in one process
    python -m esm_dual.train.tf_finetune --model DIR --fasta seqs.fasta --strategy mirrored --output run/
    # one process per host, TF_CONFIG describing the cluster on each
    TF_CONFIG='{"cluster": {"worker": ["h1:12345", "h2:12345"]}, "task": {"type": "worker", "index": 0}}' \\
        python -m esm_dual.train.tf_finetune ... --strategy multi-worker

Tasks: ``regression`` (float in the header's last ``|`` field) and ``mlm``. The model's own loss is a
per-replica mean divided by the number of replicas (``TFEsmPreTrainedModel.compute_loss``), so with
equal per-replica batches and no dropout N replicas train like one device on the same global batch.
The chief writes the final model to ``OUTPUT/final/`` (hub layout); other workers write
``OUTPUT/final-worker{i}/`` (MultiWorkerMirroredStrategy wants every worker to save somewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esm_dual.train.tf_finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--fasta", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--task", choices=("regression", "mlm"), default="regression")
    p.add_argument("--strategy", choices=("none", "mirrored", "multi-worker"), default="mirrored")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="split the CPU into N logical devices (testing MirroredStrategy without GPUs)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=1022)
    p.add_argument("--max-records", type=int, default=0)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def _patch_reduce(strategy) -> None:
    """Keras 3 (3.15) and MultiWorkerMirroredStrategy: Keras passes ``strategy.reduce`` a whole (x, y)
    batch structure before building, and scalar logs with ``axis=0``; the strategy takes one value, and
    no axis for scalars. Reduce leaf by leaf, scalars without an axis."""
    import tensorflow as tf

    reduce = strategy.reduce

    def leaf(op, v, axis):
        local = strategy.experimental_local_results(v)[0]
        if axis is not None and getattr(local, "shape", None) is not None and local.shape.rank == 0:
            axis = None
        return reduce(op, v, axis=axis)

    strategy.reduce = lambda op, value, axis=None: tf.nest.map_structure(lambda v: leaf(op, v, axis), value)


def make_strategy(name: str, cpu_devices: int = 0):
    import tensorflow as tf

    if cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    if name == "mirrored":
        devices = None
        if cpu_devices and not tf.config.list_physical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi-worker":
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
        _patch_reduce(strategy)
        return strategy
    return tf.distribute.get_strategy()


def train(args) -> int:
    # tf.distribute strategies: the Keras TensorFlow backend, whatever KERAS_BACKEND says (unless Keras is
    # already imported in this process with another backend: then say so).
    os.environ["KERAS_BACKEND"] = "tensorflow"
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != "tensorflow":
        raise SystemExit("tf_finetune needs the Keras TensorFlow backend; Keras was imported with "
                         f"{sys.modules['keras'].backend.backend()!r}")
    strategy = make_strategy(args.strategy, args.cpu_devices)  # before any other TF op

    import keras

    from ..common.fasta import read_fasta
    from ..tf import TFEsmForMaskedLM, TFEsmForSequenceClassification
    from ..tf.data import make_dataset

    records = []
    for i, r in enumerate(read_fasta(args.fasta)):
        if args.max_records and i >= args.max_records:
            break
        records.append(r)
    seqs = [r.sequence for r in records]
    overrides = {}
    if args.dropout is not None:
        overrides.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        if args.task == "regression":
            labels = [float(r.description.rsplit("|", 1)[-1]) for r in records]
            model = TFEsmForSequenceClassification.from_pretrained(args.model, num_labels=1,
                                                                   problem_type="regression", **overrides)
            data = make_dataset(seqs, labels, batch_size=args.global_batch_size, seed=args.seed,
                                truncation_length=args.max_length)
        else:
            model = TFEsmForMaskedLM.from_pretrained(args.model, **overrides)
            data = make_dataset(seqs, batch_size=args.global_batch_size, mlm=True, seed=args.seed,
                                truncation_length=args.max_length)
        model.compile(optimizer=keras.optimizers.Adam(args.lr))
    history = model.fit(data, epochs=args.epochs, verbose=0, shuffle=False)

    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    chief = args.strategy != "multi-worker" or int(task.get("index", 0)) == 0
    out = os.path.join(args.output, "final" if chief else f"final-worker{task.get('index')}")
    model.save_pretrained(out)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump({"loss": [float(x) for x in history.history["loss"]],
                   "replicas": int(strategy.num_replicas_in_sync)}, f)
    return 0


def main(argv: list[str] | None = None) -> int:
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
