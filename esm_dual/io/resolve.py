"""Names users pass instead of paths: preset names (``"esm2_t33_650M_UR50D"``), hub ids
(``"facebook/esm2_t33_650M_UR50D"``), downloaded into the HF cache when the network allows.

:func:`resolve_checkpoint` turns any of them into a local path. Importing this module also lets
``EsmConfig.from_pretrained`` take preset names and hub ids (``esm_dual`` imports it): ``common/config.py``
imports nothing of the package, so it asks the resolver registered here.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..common import config as _config
from ..common.config import CONFIG_NAME
from ..common.hf_hub import local_subfolder
from ..common.presets import get_preset
from .base import PT_WEIGHTS_INDEX_NAME, PT_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, CheckpointError

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _manual_instructions(hub_id: str) -> str:
    preset = get_preset(hub_id, missing_ok=True)
    lines = [
        "Pass a local path instead, either:",
        f"  * a directory in the hub layout holding {CONFIG_NAME} and {SAFE_WEIGHTS_NAME} (or "
        f"{SAFE_WEIGHTS_INDEX_NAME} + its shards): fetch them by hand from "
        f"https://huggingface.co/{hub_id}/tree/main "
        f"(e.g. `hf download {hub_id} {CONFIG_NAME} {SAFE_WEIGHTS_NAME} --local-dir DIR` on a "
        "machine with network access) and pass DIR;",
    ]
    if preset is not None and preset.family != "esmfold":
        extra = f" and {preset.contact_regression_url} beside it" if preset.contact_regression_url else ""
        lines.append(
            f"  * or a fair-esm .pt file: download {preset.fair_esm_url}{extra}, and pass the .pt path."
        )
    elif preset is not None:
        lines.append(
            f"  * or fair-esm's {preset.fair_esm_url} with the ESM-2 3B stem esm2_t36_3B_UR50D.pt beside it "
            "(or --esm-checkpoint), and pass the .pt path."
        )
    else:
        lines.append("  * or a fair-esm .pt file path.")
    return "\n".join(lines)


def resolve_checkpoint(
    x: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: str | None = None,
    proxies: dict[str, str] | None = None,
) -> str:
    """Turn ``x`` into a local path.

    An existing file or directory is returned as is; a preset name becomes its hub id; a hub id
    (``"owner/name"``) is downloaded with ``huggingface_hub.snapshot_download`` into the HF cache (only
    ``config.json``, ``*.safetensors``, ``*.json``, ``vocab.txt``; ``pytorch_model*.bin`` only when the repo
    has no safetensors). Offline (``HF_HUB_OFFLINE=1``), without ``huggingface_hub``, or on a connection
    error, a cached snapshot is used if there is one, else ``CheckpointError`` says what to pass instead.
    HF's hub arguments (``revision``, ``token``, ``local_files_only``, ``force_download``, ``proxies``) go to
    ``snapshot_download``; ``subfolder`` selects a directory inside the checkpoint (local or downloaded). A
    token never appears in an error message.
    """
    s = os.fspath(x)
    if os.path.exists(s):
        return local_subfolder(s, subfolder)
    preset = get_preset(s, missing_ok=True)
    if preset is not None:
        hub_id = preset.hub_id
    elif _HUB_ID_RE.match(s):
        hub_id = s
    else:
        raise CheckpointError(
            f"{s!r} is not an existing file or directory, a known preset or a hub id ('owner/name')"
        )
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"cannot download {hub_id!r}: huggingface_hub is not installed (pip install 'esm-dual[hub]').\n"
            + _manual_instructions(hub_id)
        ) from None
    kwargs: dict[str, Any] = {"repo_id": hub_id}
    if cache_dir is not None:
        kwargs["cache_dir"] = os.fspath(cache_dir)
    for key, value in (("revision", revision), ("token", token), ("proxies", proxies)):
        if value is not None:
            kwargs[key] = value
    if force_download:
        kwargs["force_download"] = True
    prefix = subfolder.strip("/") + "/" if subfolder else ""
    patterns = [prefix + p for p in (CONFIG_NAME, "*.safetensors", "*.json", "vocab.txt")]
    bin_patterns = [prefix + p for p in (PT_WEIGHTS_NAME, "pytorch_model-*.bin", PT_WEIGHTS_INDEX_NAME)]

    def has_weights(d: str) -> bool:
        return any(os.path.isfile(os.path.join(d, n)) for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))

    offline = _offline() or bool(local_files_only)
    try:
        if offline:
            path = huggingface_hub.snapshot_download(
                **kwargs, allow_patterns=patterns + bin_patterns, local_files_only=True
            )
        else:
            path = huggingface_hub.snapshot_download(**kwargs, allow_patterns=patterns)
            if not has_weights(os.path.join(path, prefix)):
                path = huggingface_hub.snapshot_download(**kwargs, allow_patterns=patterns + bin_patterns)
    except Exception as e:  # offline mode, connection errors, missing repos: all end the same way
        if offline:
            reason = ("local_files_only=True" if local_files_only else "offline mode (HF_HUB_OFFLINE=1)") + \
                " and no cached copy"
        else:
            reason = f"{type(e).__name__}: {e}"
        if isinstance(token, str) and token:
            reason = reason.replace(token, "***")
        if revision is not None:
            reason += f" (revision {revision!r})"
        raise CheckpointError(
            f"cannot fetch {hub_id!r} from the Hugging Face hub ({reason}).\n" + _manual_instructions(hub_id)
        ) from None
    path = os.path.join(path, prefix.rstrip("/")) if prefix else path
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise CheckpointError(
            f"{hub_id!r}: the downloaded snapshot at {path} has no {CONFIG_NAME}.\n"
            + _manual_instructions(hub_id)
        )
    return path



def looks_local(p: str) -> bool:
    """A path that cannot be a preset name or a hub id ("owner/name"): absolute, ./, ~, a .json file."""
    return (
        os.path.isabs(p) or p.startswith((".", "~")) or p.endswith(".json") or p.count("/") > 1 or "\\" in p
    )


def resolve_config_name(name: str) -> dict[str, Any] | str:
    """What ``EsmConfig.from_pretrained(name)`` reads for a name that is not an existing path: a preset's
    published ``config.json`` (as a dict, nothing downloaded), else the directory a hub id resolves to."""
    if looks_local(name):
        raise FileNotFoundError(f"no config file or directory at {name}")
    preset = get_preset(name, missing_ok=True)
    if preset is not None:
        return preset.config.to_dict()
    return resolve_checkpoint(name)


_config.register_name_resolver(resolve_config_name)

__all__ = ["looks_local", "resolve_checkpoint", "resolve_config_name"]
