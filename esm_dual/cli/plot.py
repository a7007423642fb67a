"""``--plot`` for ``embed`` (contact maps) and ``score`` (per-position scores). matplotlib is optional
(``pip install 'esm-dual[plot]'``); it is imported only when a plot is asked for."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from ._common import CliError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def require_matplotlib():
    """Import matplotlib with a non-interactive backend, or raise a one-line CliError."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib, which is not installed: "
                       "pip install 'esm-dual[plot]'") from None
    return plt


def safe_name(label: str, max_len: int = 120) -> str:
    """A file-name-safe version of a record label. A label that had to change (unsafe characters, too long)
    gets 8 hex characters of its hash appended, so two labels never share a name ('a|b' and 'a_b' stay
    apart) and a label always gets the same name."""
    s = _UNSAFE.sub("_", label).strip("._") or "record"
    if s == label and len(s) <= max_len:
        return s
    import hashlib

    return s[:max_len] + "-" + hashlib.blake2b(label.encode("utf-8"), digest_size=4).hexdigest()


class ContactPlotter:
    """Collects contact maps as ``embed`` produces them.

    ``path`` ending in ``.png``: one figure with the maps of ``wanted`` (the first records of the input);
    written by ``finish``. Any other path: a directory with one ``<label>.png`` per record, written at once.
    """

    def __init__(self, path: str, wanted: Sequence[str] = ()):
        self.plt = require_matplotlib()
        self.path = path
        self.single = path.lower().endswith(".png")
        self.wanted = list(wanted)
        self.maps: dict[str, np.ndarray] = {}
        self.count = 0
        if not self.single:
            if os.path.isfile(path):
                raise CliError(f"--plot {path}: exists and is a file (use a .png name for one figure)")
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def wants(self, record_id: str) -> bool:
        return (not self.single) or (record_id in self.wanted and record_id not in self.maps)

    def add(self, record_id: str, cmap: np.ndarray) -> None:
        if not self.wants(record_id):
            return
        if self.single:
            self.maps[record_id] = np.asarray(cmap, dtype=np.float32)
            return
        fig, ax = self.plt.subplots(figsize=(5, 4.4))
        _draw_map(fig, ax, record_id, cmap)
        fig.tight_layout()
        fig.savefig(os.path.join(self.path, safe_name(record_id) + ".png"), dpi=100)
        self.plt.close(fig)
        self.count += 1

    def finish(self) -> str:
        if not self.single:
            return self.path
        items = [(r, self.maps[r]) for r in self.wanted if r in self.maps]
        if not items:
            return self.path
        n = len(items)
        cols = min(n, 2)
        rows = (n + cols - 1) // cols
        fig, axes = self.plt.subplots(rows, cols, figsize=(5 * cols, 4.4 * rows), squeeze=False)
        for ax, (rid, cmap) in zip(axes.flat, items):
            _draw_map(fig, ax, rid, cmap)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(self.path, dpi=100)
        self.plt.close(fig)
        self.count = n
        return self.path


def _draw_map(fig, ax, title: str, cmap: np.ndarray) -> None:
    im = ax.imshow(cmap, cmap="Blues", vmin=0.0, vmax=1.0, origin="upper", interpolation="nearest")
    ax.set_title(title if len(title) <= 60 else title[:57] + "...", fontsize=9)
    ax.set_xlabel("residue")
    ax.set_ylabel("residue")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="contact probability")


def plot_scores(path: str, sequence: str, positions: np.ndarray, scores: dict[str, np.ndarray],
                offset_idx: int) -> str:
    """Per-position plot of variant scores: every variant as a dot, the per-position mean as a line.

    ``positions``: 0-based sequence index of each scored row; ``scores``: column name -> [rows].
    """
    plt = require_matplotlib()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    names = list(scores)
    # A fixed, readable page width (1,200 px at 120 dpi) and 3.6 inches per model, whatever the sequence length
    # (a width that grew with the sequence gave a 2,400 x 280 px strip).
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3.6 * len(names)), squeeze=False, sharex=True)
    x_all = np.asarray(positions) + offset_idx
    for ax, name in zip(axes[:, 0], names):
        y = np.asarray(scores[name], dtype=np.float64)
        ok = np.isfinite(y)
        ax.scatter(x_all[ok], y[ok], s=6, alpha=0.4, color="tab:blue", label="variant")
        uniq = np.unique(x_all[ok])
        means = np.array([y[ok][x_all[ok] == u].mean() for u in uniq])
        ax.plot(uniq, means, color="tab:red", lw=1.2, label="mean per position")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_ylabel("score")
        ax.set_title(name if len(name) <= 80 else "..." + name[-77:], fontsize=9)
    axes[0, 0].legend(loc="lower left", fontsize=8)
    axes[-1, 0].set_xlabel(f"position (numbering of the mutation column, offset {offset_idx})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
