"""``esm-dual init MODEL OUTDIR --random``: write a checkpoint of RANDOM weights in a preset's shape.

For trying every command offline (no hub access) and for tests: OUTDIR gets ``config.json`` +
``model.safetensors`` in the hub layout, exactly as the real checkpoint of that preset is laid out (an ESM
masked-LM model with its contact head, or ESMFold with its ESM-2 stem), so ``embed``, ``score``, ``fold``,
``info``, ``convert`` and ``from_pretrained`` read it as they read the real one. ``--tiny`` keeps the preset's
kind but shrinks it to a few layers of small width (seconds on a CPU, also for ESMFold).

The weights are random: every output means nothing. ``config.json`` records it under
``esm_dual_random_init`` (seed, the preset it imitates), ``esm-dual info`` and the model-loading commands
say so, and this command prints a warning.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ._common import RANDOM_MARKER, CliError, UsageError, add_model_argument, note, resolve_positionals, warn

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# --tiny: the kind of the preset at test size (odd widths on purpose, as the tests' configs).
_TINY_ESM = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
_TINY_FOLD = dict(
    lddt_head_hid_dim=16,
    trunk=dict(num_blocks=1, sequence_state_dim=32, pairwise_state_dim=16, sequence_head_width=8,
               pairwise_head_width=8, position_bins=8, max_recycles=1, chunk_size=None,
               structure_module=dict(sequence_dim=24, pairwise_dim=12, ipa_dim=8, resnet_dim=16, num_heads_ipa=2,
                                     num_qk_points=2, num_v_points=2, num_blocks=2)),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("_positionals", nargs="*", metavar="MODEL OUTDIR",
                   help="MODEL: a preset name (esm-dual info --presets), hub id or fair-esm name whose shape to "
                   "use; OUTDIR: the directory to write")
    add_model_argument(p, help="the preset whose shape to use (instead of the first positional)")
    p.add_argument("--random", action="store_true",
                   help="required: say that you want random weights (the real ones come from the hub)")
    p.add_argument("--tiny", action="store_true",
                   help="shrink to test size (2 layers, hidden 48; ESMFold: a 1-block trunk): seconds on a CPU")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): the same seed writes the "
                   "same weights")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32", help="stored precision (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTDIR's checkpoint if it has one")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes (the random-weights warning stays)")


def random_config(model: str, *, tiny: bool = False, seed: int = 0):
    """The preset's config (shrunk with ``tiny``), marked as random in ``config.extra``."""
    from ..common.config import EsmConfig
    from ..common.presets import get_preset

    preset = get_preset(model, missing_ok=True)
    if preset is None:
        raise CliError(f"init: {model!r} is not a known preset (esm-dual info --presets lists them)")
    d: dict[str, Any] = preset.config.to_dict()
    if tiny:
        d.update(_TINY_ESM)
        if preset.family == "esmfold":
            d["esmfold_config"] = {**d["esmfold_config"], **_TINY_FOLD, "fp16_esm": False}
    d[RANDOM_MARKER] = {
        "seed": seed,
        "shape_of": preset.name + (" (tiny)" if tiny else ""),
        "note": "RANDOM weights written by `esm-dual init --random`: every output is meaningless",
    }
    return EsmConfig.from_dict(d), preset


def write_random_checkpoint(model: str, outdir: str, *, tiny: bool = False, seed: int = 0,
                            dtype: str = "fp32") -> Any:
    """Build the preset's PyTorch model with random weights (seeded) and save it to ``outdir``; the config."""
    try:
        import torch
    except ImportError:
        raise CliError("init builds the model with PyTorch: pip install 'esm-dual[torch]'") from None
    config, preset = random_config(model, tiny=tiny, seed=seed)
    torch.manual_seed(seed)
    if config.is_folding_model:
        from ..pt.folding import EsmForProteinFolding

        model_ = EsmForProteinFolding(config)
    else:
        from ..pt.modeling_esm import EsmForMaskedLM

        model_ = EsmForMaskedLM(config)
    if dtype != "fp32":
        from ..pt.integration import str_to_torch_dtype

        model_ = model_.to(str_to_torch_dtype(dtype))
    model_.save_pretrained(outdir)
    return config


def run(args: argparse.Namespace) -> int:
    resolve_positionals(args, ("model", "outdir"), "init")
    if not args.random:
        raise UsageError(f"init writes random weights only: add --random (the real {args.model} comes from the hub: "
                         "`hf download facebook/<name> config.json model.safetensors --local-dir DIR`)")
    out = args.outdir
    if os.path.isfile(out):
        raise CliError(f"init: {out} is a file; OUTDIR must be a directory")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        existing = [n for n in ("config.json", "model.safetensors") if os.path.exists(os.path.join(out, n))]
        if existing:
            raise CliError(f"init: {out} already holds {', '.join(existing)}; pass --overwrite to replace it")
    config = write_random_checkpoint(args.model, out, tiny=args.tiny, seed=args.seed, dtype=args.dtype)
    shape = config.extra[RANDOM_MARKER]["shape_of"]
    what = "ESMFold" if config.is_folding_model else f"{config.num_hidden_layers} layers, hidden {config.hidden_size}"
    warn(f"{out} holds RANDOM weights (seed {args.seed}) in the shape of {shape}: every output of it is "
         "meaningless; use it to try the commands offline, not for science")
    note(f"wrote {out}/config.json + model.safetensors ({what}, {args.dtype})", args.quiet)
    return 0
