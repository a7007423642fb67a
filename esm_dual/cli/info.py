"""``esm-dual info``: describe a checkpoint (architecture, sizes, parameters, layout, heads), or list the
known presets. Reads the checkpoint's tensors with numpy only: neither torch nor TensorFlow is needed for
hub-layout directories (fair-esm ``.pt`` files need torch to unpickle)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._common import CliError, UsageError, add_model_argument, is_random


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("_positionals", nargs="*", metavar="MODEL",
                   help="preset name, hub id, hub-layout directory or fair-esm .pt file (or give it as --model)")
    add_model_argument(p, help=argparse.SUPPRESS)
    p.add_argument("--presets", action="store_true", help="list the known presets")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def family(config) -> str:
    if config.is_folding_model:
        return "ESMFold"
    if config.position_embedding_type == "rotary":
        return "ESM-2"
    if config.emb_layer_norm_before:
        return "ESM-1b"
    return "ESM-1v"


def heads_present(tensors: dict[str, Any]) -> list[str]:
    heads = []
    if any(k.startswith("lm_head.") for k in tensors):
        heads.append("lm_head")
    if any(k.endswith("contact_head.regression.weight") for k in tensors):
        heads.append("contact_head")
    if any(k.startswith("classifier.out_proj.") for k in tensors):
        heads.append("classifier (sequence)")
    elif any(k.startswith("classifier.") for k in tensors):
        heads.append("classifier (token)")
    if any(k.startswith(("pooler.", "esm.pooler.")) for k in tensors):
        heads.append("pooler")
    if any(k.startswith(("trunk.", "esm_s_combine", "distogram_head", "lddt_head")) for k in tensors):
        heads.append("esmfold trunk")
    return heads


def _read(location: str) -> tuple[Any, dict[str, Any], str, str]:
    """(config, tensors, source, layout) of a checkpoint; ESMFold's too (its top-level ``lm_head`` predicts
    its own 23-letter alphabet, not the ESM vocabulary that the shape check of ESM checkpoints expects)."""
    from ..io import hub
    from ..io.resolve import resolve_checkpoint

    if location.endswith(".pt") and os.path.isfile(location):
        ckpt = hub.load_checkpoint(location)  # fair-esm (ESMFold .pt files are named by the reader)
        return ckpt.config, ckpt.tensors, str(ckpt.source), ckpt.layout
    path = resolve_checkpoint(location)
    config = hub.read_checkpoint_config(path)
    if not config.is_folding_model:
        ckpt = hub.load_checkpoint(path)
        return ckpt.config, ckpt.tensors, str(ckpt.source), ckpt.layout
    kind, directory, weights = hub.classify_path(path)
    layout, _, _ = hub.hub_weights(directory, weights)
    return config, dict(hub.iter_checkpoint_tensors(path)), directory, layout


def describe(location: str) -> dict[str, Any]:
    from ..common.presets import count_parameters, get_preset

    if os.path.sep in location or location.startswith((".", "~")):
        location = os.path.expanduser(location)
        if not os.path.exists(location):
            raise CliError(f"{location}: no such file or directory")
    c, tensors, source, layout = _read(location)
    dtypes = sorted({str(a.dtype) for a in tensors.values()
                     if a.dtype.kind == "f" or "bfloat16" in str(a.dtype)})
    stored = sum(int(a.size) for k, a in tensors.items() if not k.endswith("inv_freq"))
    info: dict[str, Any] = {
        "source": source,
        "layout": layout,
        "random_weights": is_random(c),
        "family": family(c),
        "architectures": c.architectures,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_hidden_layers,
        "num_heads": c.num_attention_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "position_embedding_type": c.position_embedding_type,
        "max_position_embeddings": c.max_position_embeddings,
        "max_residues": None if c.max_sequence_positions is None else c.max_sequence_positions - 2,
        "token_dropout": c.token_dropout,
        "layer_norm_eps": c.layer_norm_eps,
        "heads": heads_present(tensors),
        "num_labels": c.num_labels if any(k.startswith("classifier.") for k in tensors) else None,
        "dtypes": dtypes,
        "parameters_stored": stored,
    }
    if not c.is_folding_model:
        info["parameters_mlm_model"] = count_parameters(c)
    else:
        trunk = (c.esmfold_config.trunk if c.esmfold_config is not None else None)
        info["folding_trunk_blocks"] = getattr(trunk, "num_blocks", None)
        info["cuequivariance"] = cueq_status()
    preset = get_preset(os.path.basename(location.rstrip("/")), missing_ok=True)
    if preset is not None and _same_shape(preset.config, c):  # a folder's name alone proves nothing
        info["preset"] = preset.name
    info["fast_path"] = fast_path_options()
    return info


def fast_path_options() -> dict[str, Any] | str:
    """The PyTorch fast path's options as this process resolves them (``FastPathOptions`` from the
    ``ESM_DUAL_*`` environment), or why there are none (no PyTorch; an invalid variable, named)."""
    try:
        from ..pt.fast.options import default_options
    except ImportError as e:  # torch is not installed: nothing to show
        return f"n/a ({type(e).__name__}: {e})"
    try:
        return default_options().as_dict()
    except ValueError as e:  # an invalid ESM_DUAL_* value: say which, as the model would
        return f"error: {e}"


def cueq_status() -> str:
    """Whether ESMFold's fast mode can use cuEquivariance's kernels here (``esm-dual[fold-gpu]``), or why not."""
    try:
        from ..pt.folding.kernels import cueq_import_error
    except ImportError as e:  # torch is not installed
        return f"n/a ({type(e).__name__}: {e})"
    error = cueq_import_error()
    return "available" if error is None else f"not importable ({error}); the fast mode uses its SDPA fallback"


def _same_shape(a, b) -> bool:
    keys = ("is_folding_model", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size", "position_embedding_type")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _print_info(info: dict[str, Any], out) -> None:
    rows = [
        ("source", info["source"] + ("   ** RANDOM weights (esm-dual init): outputs mean nothing **"
                                     if info.get("random_weights") else "")),
        ("layout", info["layout"]),
        ("family", info["family"] + (f" (preset {info['preset']})" if info.get("preset") else "")),
        ("architectures", ", ".join(info["architectures"] or []) or "-"),
        ("hidden size", info["hidden_size"]),
        ("layers", info["num_layers"] if info["family"] != "ESMFold" else
                   f"{info['num_layers']} (ESM-2 stem); folding trunk {info.get('folding_trunk_blocks')} blocks"),
        ("attention heads", f"{info['num_heads']} (head dim {info['head_dim']})"),
        ("ffn size", info["intermediate_size"]),
        ("vocabulary", info["vocab_size"]),
        ("positions", f"{info['position_embedding_type']}, max_position_embeddings "
                      f"{info['max_position_embeddings']}"
                      + (f" (at most {info['max_residues']} residues)" if info["max_residues"]
                         else " (no length limit)")),
        ("token dropout", info["token_dropout"]),
        ("heads present", ", ".join(info["heads"]) or "none (encoder only)"),
        ("stored dtype", ", ".join(info["dtypes"]) or "-"),
        ("parameters", f"{info['parameters_stored']:,} stored"
                       + (f"; {info['parameters_mlm_model']:,} in the masked-LM model"
                          if info.get("parameters_mlm_model") else "")),
    ]
    if info.get("num_labels"):
        rows.insert(-2, ("labels", info["num_labels"]))
    fast = info.get("fast_path")
    if isinstance(fast, dict):
        from ..pt.fast.options import FastPathOptions

        fast = FastPathOptions(**fast).describe()
    if fast is not None:
        rows.append(("fast path", fast))
    if info.get("cuequivariance"):
        rows.append(("cuEquivariance", info["cuequivariance"]))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}", file=out)


def presets_table() -> list[dict[str, Any]]:
    from ..common.presets import PRESETS

    out = []
    for name, p in PRESETS.items():
        c = p.config
        out.append({"name": name, "family": p.family, "hub_id": p.hub_id, "fair_esm_name": p.fair_esm_name,
                    "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "num_params": p.num_params,
                    "contact_regression": p.has_contact_regression})
    return out


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    if getattr(args, "_positionals", None) is not None:
        given = args._positionals
        args._positionals = None
        if len(given) > 1 or (given and args.model):
            raise UsageError(f"info takes one MODEL, got {', '.join(given + ([args.model] if args.model else []))}")
        if given:
            args.model = given[0]
    if args.presets:
        if args.model:
            raise CliError("give either MODEL or --presets, not both")
        table = presets_table()
        if args.json:
            json.dump(table, out, indent=2)
            out.write("\n")
            return 0
        cols = [("name", "name"), ("family", "family"), ("hub id", "hub_id"),
                ("fair-esm name", "fair_esm_name"), ("layers", "layers"), ("hidden", "hidden_size"),
                ("params", "num_params")]
        cells = [[h for h, _ in cols]]
        for r in table:
            cells.append([_fmt_params(r[k]) if k == "num_params" else str(r[k]) for _, k in cols])
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        for j, row in enumerate(cells):
            line = "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            print(line.rstrip(), file=out)
            if j == 0:
                print("  ".join("-" * w for w in widths), file=out)
        return 0
    if not args.model:
        raise CliError("info needs a MODEL (preset name, hub id, directory or .pt file), or --presets")
    info = describe(args.model)
    if args.json:
        json.dump(info, out, indent=2)
        out.write("\n")
    else:
        _print_info(info, out)
    return 0
