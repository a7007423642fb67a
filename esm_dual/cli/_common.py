"""Helpers shared by the ``esm-dual`` subcommands: errors, messages, device/dtype choice, token-budget
batching and model loading for either backend behind one numpy-in / numpy-out ``Runner``.

Importing this module imports neither torch nor TensorFlow; ``load_runner`` imports the backend.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PROG = "esm-dual"
DTYPES = ("auto", "fp32", "bf16", "fp16")
BACKENDS = ("pt", "tf")


class CliError(Exception):
    """An error in the user's input or environment: printed as one line, exit status 2."""


class UsageError(CliError):
    """A wrong combination of arguments; ``main`` points at the subcommand's ``--help``."""


def warn(msg: str) -> None:
    _write(f"{PROG}: warning: {msg}")


def note(msg: str, quiet: bool = False) -> None:
    if not quiet:
        _write(f"{PROG}: {msg}")


def _write(line: str, stream=None) -> None:
    stream = stream or sys.stderr
    try:
        from tqdm import tqdm

        tqdm.write(line, file=stream)
    except Exception:  # pragma: no cover - tqdm missing or closed stream
        print(line, file=stream)
    try:
        stream.flush()  # a log file sees each line as it happens
    except Exception:  # pragma: no cover
        pass


def name_list(names: Sequence[str], limit: int = 10) -> str:
    """'a, b, c' or 'a, b, ... and 7 more'."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_tab_log(path: str, decode_key: Callable[[str], str] | None = None) -> dict[str, str]:
    """``key -> value`` of an appended ``<key>\t<value>`` log (the latest line wins; a line without a tab,
    as a killed run leaves, is skipped); ``{}`` where there is no file. ``decode_key`` undoes the writer's
    escaping of the key."""
    out: dict[str, str] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.rstrip("\n").rpartition("\t")
                if sep:
                    out[decode_key(key) if decode_key else key] = value
    return out


def residue_problem(ch: str) -> str:
    """What is wrong with a character that is not a residue of the model's vocabulary (for messages)."""
    if ch.islower() and ch.upper() != ch:
        return (f"lower-case {ch!r} (ESM vocabularies are upper-case; upper-case the file, or drop A3M insert "
                "columns, which are lower-case)")
    if ch == "*":
        return "'*' (a stop codon? ESM vocabularies have no stop token: end the sequence before it)"
    return f"{ch!r}, not a residue of the model's vocabulary"


def encode_records(tokenizer, records: Sequence[Any], source: str, unknown: str = "error") -> list[np.ndarray]:
    """Residue ids of FASTA records (no <cls>/<eos>). With ``unknown="error"`` a character outside the
    vocabulary is a ``CliError`` naming the file, record, position and character (never a silent ``<unk>``,
    which would also fold a run of such characters into one token and shift every later position);
    ``unknown="unk"`` maps them to ``<unk>`` as HF's tokenizer does (``--unknown-residues unk``)."""
    from ..common.tokenizer import TokenizerError

    strict = unknown != "unk"
    try:
        return tokenizer.encode_residues_np([r.sequence for r in records], strict=strict,
                                            ids=[r.id for r in records])
    except TokenizerError as e:
        if e.index is None or e.character is None:
            raise CliError(f"{source}: {e}") from None
        raise CliError(f"{source}: record {records[e.index].id!r}, residue {e.position}: "
                       f"{residue_problem(e.character)}; --unknown-residues unk reads it as <unk>") from None


# ================================================================================================
# Arguments
# ================================================================================================


MODEL_HELP = "preset name, hub id, hub-layout directory or fair-esm .pt file"
UNKNOWN_RESIDUES = ("error", "unk")


def add_model_argument(parser, *, required: bool = False, default: str | None = None, help: str = MODEL_HELP,
                       dest: str = "model", nargs: Any = None) -> None:
    """The model option every command takes the same way: ``-m``/``--model``, and fair-esm's
    ``--model-location`` as an alias."""
    kw: dict[str, Any] = {"nargs": nargs} if nargs else {}
    parser.add_argument("-m", "--model", "--model-location", dest=dest, metavar="MODEL", required=required,
                        default=default, help=help, **kw)


def add_unknown_residues_argument(parser) -> None:
    parser.add_argument("--unknown-residues", choices=UNKNOWN_RESIDUES, default="error",
                        help="a character outside the model's residues (lower-case, '*', digits): error (default, "
                        "naming the record and position) or unk (read as <unk>/X, as HF and fair-esm do)")


def resolve_positionals(args, names: Sequence[str], command: str) -> None:
    """Fill ``args.<name>`` from the positionals in ``args._positionals`` and the options already given.

    ``names`` lists the positional slots in order (e.g. ``("model", "fasta", "output")``); a slot already set
    by its option is skipped, the rest are filled from left to right; too many or too few is a ``UsageError``.
    Calling it twice is harmless.
    """
    given = getattr(args, "_positionals", None)
    if given is None:
        return
    args._positionals = None
    free = [n for n in names if getattr(args, n, None) is None]
    if len(given) > len(free):
        extra = " ".join(given[len(free):])
        raise UsageError(f"{command}: unexpected argument(s) {extra!r}"
                         + (f" ({', '.join(n.upper() for n in names if n not in free)} given as an option)"
                            if len(free) < len(names) else ""))
    for n, v in zip(free, given):
        setattr(args, n, v)
    missing = [n for n in names if getattr(args, n, None) is None]
    if missing:
        raise UsageError(f"{command}: missing {', '.join(n.upper() for n in missing)}")


def add_model_runtime_arguments(parser, *, nogpu: bool = False) -> None:
    """--backend, --device, --dtype (and fair-esm's --nogpu where the original script had it)."""
    parser.add_argument("--backend", choices=BACKENDS, default="pt",
                        help="framework that runs the model: pt (PyTorch, default) or tf (TensorFlow)")
    parser.add_argument("--device", default="auto",
                        help="auto (GPU if one is visible, default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="compute precision: auto (fp32 on CPU, fp16 on GPU), fp32, bf16 or fp16")
    if nogpu:
        parser.add_argument("--nogpu", action="store_true", help="do not use a GPU even if one is available "
                            "(fair-esm's flag; same as --device cpu)")


def positive_int(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# ================================================================================================
# Batching
# ================================================================================================


def token_batches(lengths: Sequence[int], toks_per_batch: int,
                  extra_toks_per_seq: int = 2) -> list[list[int]]:
    """Indices grouped into batches of at most ``toks_per_batch`` padded tokens, shortest first.

    fair-esm's ``FastaBatchedDataset.get_batch_indices``: sort by length, add sequences while
    ``max_len * count <= toks_per_batch`` (a sequence longer than the budget gets a batch of its own).
    ``extra_toks_per_seq`` counts the BOS/EOS tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    buf: list[int] = []
    max_len = 0
    for i in order:
        sz = int(lengths[i]) + extra_toks_per_seq
        if buf and max(sz, max_len) * (len(buf) + 1) > toks_per_batch:
            batches.append(buf)
            buf, max_len = [], 0
        max_len = max(max_len, sz)
        buf.append(i)
    if buf:
        batches.append(buf)
    return batches


# ================================================================================================
# Device and precision
# ================================================================================================


def pick_device(device: str, backend: str, nogpu: bool = False) -> str:
    """'cpu', 'cuda' or 'cuda:N' (torch naming; the TF runner maps it to '/GPU:N')."""
    device = (device or "auto").lower()
    if nogpu:
        if device not in ("auto", "cpu"):
            raise CliError(f"--nogpu contradicts --device {device}")
        return "cpu"
    if device == "auto":
        return "cuda" if gpu_available(backend) else "cpu"
    if device == "gpu":
        device = "cuda"
    if device != "cpu" and not device.startswith("cuda"):
        raise CliError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not gpu_available(backend):
        fw = "PyTorch" if backend == "pt" else "TensorFlow"
        raise CliError(f"--device {device}: no GPU is visible to {fw}")
    return device


def gpu_available(backend: str) -> bool:
    if backend == "pt":
        import torch

        return torch.cuda.is_available()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def pick_dtype(dtype: str, device: str) -> str:
    """'fp32', 'bf16' or 'fp16'. auto: fp32 on CPU, fp16 on GPU (ESM was trained in fp16)."""
    if dtype in (None, "auto"):
        return "fp32" if device == "cpu" else "fp16"
    return dtype


# ================================================================================================
# Model loading
# ================================================================================================


class _Capture(logging.Filter):
    """Logger filter that keeps the warnings of a model load (the caller decides which to show)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
            return False
        return True

    def __enter__(self) -> _Capture:
        logging.getLogger("esm_dual").addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("esm_dual").removeFilter(self)


def _load_checkpoint(location: str):
    from ..io.hub import load_checkpoint

    if os.path.exists(location) or location.startswith((".", "/", "~")):
        if not os.path.exists(os.path.expanduser(location)):
            raise CliError(f"model {location!r}: no such file or directory")
        location = os.path.expanduser(location)
    return load_checkpoint(location)


def has_contact_regression(tensors: dict[str, Any]) -> bool:
    return any(k.endswith("contact_head.regression.weight") for k in tensors)


def has_lm_head(tensors: dict[str, Any]) -> bool:
    return any(k.startswith("lm_head.") for k in tensors)


class Runner:
    """A loaded model behind numpy in/out calls, the same for both backends."""

    backend = "?"

    def __init__(self, location: str, ckpt, head: str, device: str, dtype: str):
        from ..common.tokenizer import EsmTokenizer

        self.location = location
        self.config = ckpt.config
        self.source = str(getattr(ckpt, "source", location))
        self.head = head
        self.device = device
        self.dtype = dtype
        self.num_layers = self.config.num_hidden_layers
        self.hidden_size = self.config.hidden_size
        self.has_contact_regression = has_contact_regression(ckpt.tensors)
        vocab = self.config.vocab_list
        self.tokenizer = EsmTokenizer(vocab=vocab) if vocab else EsmTokenizer()
        self.cls_id = self.tokenizer.cls_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 1
        self.mask_id = self.config.mask_token_id if self.config.mask_token_id is not None else \
            self.tokenizer.mask_token_id
        self.load_messages: list[str] = []

    @property
    def max_residues(self) -> int | None:
        """Longest sequence (residues) the model's positions allow; None when unlimited (rotary)."""
        lim = self.config.max_sequence_positions
        return None if lim is None else lim - 2

    def token_id(self, residue: str) -> int | None:
        """Id of a one-letter residue token, or None when the vocabulary lacks it."""
        v = self.tokenizer.get_vocab()
        return v.get(residue)

    def pad(self, residue_ids: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Residue id arrays -> tokens [B, L] with <cls>/<eos>, right padding, and mask [B, L]."""
        L = max(len(r) for r in residue_ids) + 2
        ids = np.full((len(residue_ids), L), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(residue_ids), L), dtype=np.int64)
        for b, r in enumerate(residue_ids):
            n = len(r)
            ids[b, 0] = self.cls_id
            ids[b, 1:n + 1] = r
            ids[b, n + 1] = self.eos_id
            mask[b, :n + 2] = 1
        return ids, mask

    # Implemented by the backends.
    def representations(self, ids: np.ndarray, mask: np.ndarray, layers: Sequence[int], contacts: bool,
                        per_token: bool = True) -> Representations:
        """Hidden states of ``layers`` for a batch from :meth:`pad`: the mean over each sequence's residues and
        the <cls> row always, every position only with ``per_token`` (copying [B, L, D] to the host is what a
        mean-only job would otherwise spend most of its host time on), contact maps with ``contacts``."""
        raise NotImplementedError

    def log_probs(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """log-softmax of the LM logits, float32: [B, L, V], or [B, V] at ``positions`` [B] (one per row)."""
        raise NotImplementedError


@dataclass
class Representations:
    """A batch's hidden states (float32), per requested layer: ``mean`` [B, D] over each sequence's residues
    (positions 1..n: no BOS/EOS/padding), ``bos`` [B, D] (the <cls> row), ``tokens`` [B, L, D] every position
    (None unless asked for); ``contacts`` [B, L-2, L-2] or None."""

    mean: dict[int, np.ndarray]
    bos: dict[int, np.ndarray]
    tokens: dict[int, np.ndarray] | None
    contacts: np.ndarray | None = None

    @classmethod
    def from_tokens(cls, tokens: dict[int, np.ndarray], mask: np.ndarray, per_token: bool,
                    contacts: np.ndarray | None = None) -> Representations:
        """Means and <cls> rows computed on the host from [B, L, D] states (sequences as :meth:`Runner.pad`
        lays them out: BOS, n residues, EOS)."""
        n = mask.sum(-1) - 2
        mean = {layer: np.stack([t[i, 1:k + 1].mean(0) for i, k in enumerate(n)]).astype(np.float32)
                for layer, t in tokens.items()}
        bos = {layer: np.ascontiguousarray(t[:, 0], dtype=np.float32) for layer, t in tokens.items()}
        return cls(mean, bos, tokens if per_token else None, contacts)


class TorchRunner(Runner):
    backend = "pt"

    def __init__(self, location: str, ckpt, head: str, device: str, dtype: str):
        super().__init__(location, ckpt, head, device, dtype)
        import torch

        from ..pt.modeling_esm import EsmForMaskedLM, EsmModel

        self.torch = torch
        cls = EsmForMaskedLM if head == "mlm" else EsmModel
        kwargs = {"add_pooling_layer": False} if cls is EsmModel else {}
        with _Capture() as cap:
            model = cls.from_checkpoint(ckpt, dtype=dtype, device=device, **kwargs)
        self.load_messages = cap.messages
        self.model = model
        self.encoder = model if cls is EsmModel else model.esm

    def representations(self, ids, mask, layers, contacts, per_token=True):
        torch = self.torch
        with torch.inference_mode():
            ids_t = torch.from_numpy(ids).to(self.device)
            mask_t = torch.from_numpy(mask).to(self.device)
            # every layer's states only when a layer other than the last is wanted
            all_layers = any(layer != self.num_layers for layer in layers)
            out = self.encoder(ids_t, attention_mask=mask_t, output_hidden_states=all_layers,
                               output_attentions=contacts)
            states = {layer: (out.hidden_states[layer] if all_layers else out.last_hidden_state)
                      for layer in layers}
            # The means and <cls> rows on the device: only [B, D] per layer crosses to the host.
            n = mask_t.sum(-1, keepdim=True) - 2
            pos = torch.arange(ids_t.shape[1], device=ids_t.device)
            residues = ((pos >= 1) & (pos <= n)).unsqueeze(-1)  # [B, L, 1]: positions 1..n
            mean, bos, tokens = {}, {}, {} if per_token else None
            for layer, h in states.items():
                h = h.float()
                mean[layer] = (torch.where(residues, h, 0.0).sum(1) / n.clamp_min(1)).cpu().numpy()
                bos[layer] = h[:, 0].cpu().numpy()
                if per_token:
                    tokens[layer] = h.cpu().numpy()
            cmaps = None
            if contacts:
                # [B, layers, H, L, L]; attention to and from padding zeroed, as in predict_contacts.
                attns = torch.stack(out.attentions, dim=1)
                m = mask_t.to(attns.dtype)
                attns = attns * m[:, None, None, None, :] * m[:, None, None, :, None]
                cmaps = self.encoder.contact_head(ids_t, attns).float().cpu().numpy()
        return Representations(mean, bos, tokens, cmaps)

    def log_probs(self, ids, mask, positions=None):
        torch = self.torch
        with torch.inference_mode():
            ids_t = torch.from_numpy(ids).to(self.device)
            mask_t = torch.from_numpy(mask).to(self.device)
            logits = self.model(ids_t, attention_mask=mask_t).logits
            if positions is not None:
                pos = torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(self.device)
                # [B, V]
                logits = logits[torch.arange(logits.shape[0], device=logits.device), pos]
            return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()


class TFRunner(Runner):
    backend = "tf"

    def __init__(self, location: str, ckpt, head: str, device: str, dtype: str):
        super().__init__(location, ckpt, head, device, dtype)
        import tensorflow as tf

        from ..tf import modeling_esm as tfm

        self.tf = tf
        gpu = device.split(":")[1] if ":" in device else "0"
        self.tf_device = "/CPU:0" if device == "cpu" else f"/GPU:{gpu}"
        cls = tfm.TFEsmForMaskedLM if head == "mlm" else tfm.TFEsmModel
        policy = {"fp32": None, "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}[dtype]
        kwargs = {"add_pooling_layer": False} if cls is tfm.TFEsmModel else {}
        with _Capture() as cap:
            # policy: a Keras mixed-precision policy (fp32 variables, fp16/bf16 compute) or None (fp32)
            self.model = cls.from_checkpoint(ckpt, dtype=policy, device=self.tf_device, **kwargs)
        self.load_messages = cap.messages
        self.encoder = self.model if head != "mlm" else self.model.esm

    def representations(self, ids, mask, layers, contacts, per_token=True):
        tf = self.tf
        with tf.device(self.tf_device):
            ids_t = tf.constant(ids.astype(np.int32))
            mask_t = tf.constant(mask.astype(np.int32))
            out = self.encoder(ids_t, attention_mask=mask_t, output_hidden_states=True,
                               output_attentions=contacts, training=False)
            reps = {layer: np.asarray(tf.cast(out.hidden_states[layer], tf.float32)) for layer in layers}
            cmaps = None
            if contacts:
                # [B, layers, H, L, L]; attention to and from padding zeroed, as in predict_contacts.
                attns = tf.stack(out.attentions, axis=1)
                m = tf.cast(mask_t, attns.dtype)
                attns = attns * m[:, None, None, None, :] * m[:, None, None, :, None]
                cmaps = np.asarray(tf.cast(self.encoder.contact_head(ids_t, attns), tf.float32))
        return Representations.from_tokens(reps, mask, per_token, cmaps)

    def log_probs(self, ids, mask, positions=None):
        tf = self.tf
        with tf.device(self.tf_device):
            out = self.model(tf.constant(ids.astype(np.int32)),
                             attention_mask=tf.constant(mask.astype(np.int32)), training=False)
            logits = tf.cast(out.logits, tf.float32)
            if positions is not None:
                idx = np.stack([np.arange(len(positions)), np.asarray(positions)], axis=1).astype(np.int32)
                logits = tf.gather_nd(logits, idx)
            return np.asarray(tf.nn.log_softmax(logits, axis=-1))


def load_runner(location: str, *, backend: str = "pt", head: str = "base", device: str = "auto",
                dtype: str = "auto", nogpu: bool = False) -> Runner:
    """Load ``location`` (preset name, hub id, hub-layout directory or fair-esm .pt) for ``backend``.

    ``head``: "base" (encoder + contact head) or "mlm" (with the language-model head).
    """
    if backend not in BACKENDS:
        raise CliError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    try:
        if backend == "pt":
            import torch  # noqa: F401
        else:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
            # --backend tf runs the Keras models on TensorFlow (tf.device placement, tf tensors), whatever
            # KERAS_BACKEND a user set for their own Keras work.
            os.environ["KERAS_BACKEND"] = "tensorflow"
            import tensorflow  # noqa: F401
    except ImportError:
        extra = "torch" if backend == "pt" else "tf"
        raise CliError(f"--backend {backend} needs {'PyTorch' if backend == 'pt' else 'TensorFlow'}: "
                       f"pip install 'esm-dual[{extra}]'") from None
    dev = pick_device(device, backend, nogpu)
    dt = pick_dtype(dtype, dev)
    ckpt = _load_checkpoint(location)
    warn_if_random(location, ckpt.config)
    if getattr(ckpt.config, "is_folding_model", False):
        raise CliError(f"{location} is an ESMFold checkpoint; use its language model, or `esm-dual fold`")
    if head == "mlm" and not has_lm_head(ckpt.tensors):
        raise CliError(f"{location} has no language-model head (lm_head.*); "
                       "scoring needs a masked-LM checkpoint")
    cls = TorchRunner if backend == "pt" else TFRunner
    return cls(location, ckpt, head, dev, dt)


def quiet_frameworks() -> None:
    """``-q``: silence the frameworks' own log lines as well (TensorFlow's C++ logs are read from the environment
    when TensorFlow loads, so this runs before any import of it; absl and the Python loggers of TensorFlow,
    Keras, transformers and the hub client drop to errors). esm-dual's own warnings still show."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice is printed at level 0 regardless
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("tensorflow", "absl", "keras", "h5py", "transformers", "huggingface_hub", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # absl's handler, if absl is installed (TensorFlow pulls it in); it does not import TensorFlow
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


# ================================================================================================
# Progress
# ================================================================================================


class LogProgress:
    """Progress for a stderr that is not a terminal (a log file, a batch system): one plain line every
    ``interval`` seconds and one at the end, never a ``\r``. The subset of tqdm's interface the commands use."""

    def __init__(self, total: int, desc: str, unit: str, interval: float, stream=None) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.postfix = ""
        self.stream = stream
        self.t0 = self.last = _now()
        self.closed = False
        self.printed = 0  # n at the last line printed

    def update(self, n: int = 1) -> None:
        self.n += n
        now = _now()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def _line(self) -> None:
        self.printed = self.n
        dt = max(_now() - self.t0, 1e-9)
        rate = self.n / dt
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = (self.total - self.n) / rate if rate > 0 and self.total else None
        eta = f", about {_duration(left)} left" if left is not None and self.n < self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        _write(f"{PROG}: {self.desc}: {self.n}/{self.total} {self.unit}{pct} in {_duration(dt)}, "
               f"{rate:.2f} {self.unit}/s{extra}{eta}", self.stream)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n and self.n != self.printed:
                self._line()

    def write(self, line: str) -> None:
        _write(line, self.stream)


def _now() -> float:
    import time

    return time.monotonic()


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress(total: int, desc: str, unit: str = "seq", quiet: bool = False) -> Any:
    """A progress bar on a terminal (tqdm), periodic one-line progress when stderr is not a terminal
    (every ``ESM_DUAL_PROGRESS_INTERVAL`` seconds, default 30), nothing with ``quiet``."""
    from tqdm import tqdm

    if quiet:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)
    try:
        interval = float(os.environ.get("ESM_DUAL_PROGRESS_INTERVAL", "30"))
    except ValueError:
        interval = 30.0
    return LogProgress(total, desc, unit, interval)


# The key of ``config.extra`` (config.json) under which ``esm-dual init --random`` marks its checkpoints.
RANDOM_MARKER = "esm_dual_random_init"


def is_random(config) -> bool:
    return bool(getattr(config, "extra", {}).get(RANDOM_MARKER))


def random_warning(location: str, config) -> str | None:
    """The warning for a checkpoint ``init --random`` wrote, or None."""
    mark = getattr(config, "extra", {}).get(RANDOM_MARKER)
    if not mark:
        return None
    shape = mark.get("shape_of", "?") if isinstance(mark, dict) else "?"
    return f"{location} holds RANDOM weights (esm-dual init, shape of {shape}): its outputs mean nothing"


def warn_if_random(location: str, config) -> None:
    """Say so when ``location`` holds the random weights of ``esm-dual init --random``."""
    msg = random_warning(location, config)
    if msg:
        warn(msg)


def configure_logging() -> logging.Handler:
    """Library warnings (logger "esm_dual") go to stderr as one line each; returns the handler so the
    caller can remove it again (``main`` does, so in-process callers keep their logging as it was)."""
    lg = logging.getLogger("esm_dual")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"{PROG}: warning: %(message)s"))
    h.setLevel(logging.WARNING)
    lg.addHandler(h)
    if lg.level == logging.NOTSET or lg.level > logging.WARNING:
        lg.setLevel(logging.WARNING)
    return h
