"""HF's loading and uploading arguments, shared by the PyTorch and Keras models (imports neither).

``from_pretrained`` takes transformers' loading arguments by name. Hub arguments (``revision``,
``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``subfolder``, ``proxies``) go to
``huggingface_hub``; the framework arguments (``device_map``, ``attn_implementation``) are resolved by each
backend; the rest of the keyword arguments must be config fields. None of them is ever written into a
config, and a token never leaves the call that uses it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

# Passed to huggingface_hub when the checkpoint is a hub id; a local path honours `subfolder` only.
HUB_ARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder", "proxies")
# Resolved by the backend (device placement, attention back end).
FRAMEWORK_ARGS = ("device_map", "attn_implementation")
# Accepted because they cannot change the result here: no code is ever fetched from the hub, and the model
# is always built without allocating its weights twice.
NO_OP_ARGS = ("trust_remote_code", "low_cpu_mem_usage", "_from_auto")
# transformers' config-level names that the config accepts besides its fields.
CONFIG_ALIASES = ("num_labels",)


class LoadingArgumentError(TypeError):
    """An argument of ``from_pretrained`` that is neither a loading argument nor a config field."""


def split_pretrained_kwargs(kwargs: dict[str, Any], config_fields: list[str] | tuple[str, ...], where: str
                            ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(hub arguments, framework arguments, config overrides) of ``from_pretrained``'s ``**kwargs``.

    ``use_auth_token`` (transformers' old name) is taken as ``token``. Any other name that is not a config
    field raises ``LoadingArgumentError`` naming it and the arguments that are accepted.
    """
    kwargs = dict(kwargs)
    if "use_auth_token" in kwargs:
        if kwargs.get("token") is not None:
            raise LoadingArgumentError(f"{where}: pass token= or use_auth_token=, not both")
        kwargs["token"] = kwargs.pop("use_auth_token")
    hub = {k: kwargs.pop(k) for k in HUB_ARGS if k in kwargs}
    framework = {k: kwargs.pop(k) for k in FRAMEWORK_ARGS if k in kwargs}
    for k in NO_OP_ARGS:
        kwargs.pop(k, None)
    allowed = set(config_fields) | set(CONFIG_ALIASES)
    unknown = sorted(k for k in kwargs if k not in allowed)
    if unknown:
        raise LoadingArgumentError(
            f"{where}: unexpected argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: neither "
            f"a loading argument ({', '.join(HUB_ARGS + FRAMEWORK_ARGS)}, dtype/torch_dtype, config) nor a config "
            "field (see EsmConfig)")
    return {k: v for k, v in hub.items() if v is not None}, framework, kwargs


def local_subfolder(path: str, subfolder: str | None) -> str:
    """``path/subfolder`` for a local checkpoint directory (checked), else ``path``."""
    if not subfolder:
        return path
    sub = os.path.join(path, subfolder)
    if not os.path.exists(sub):
        raise FileNotFoundError(f"{path}: no subfolder {subfolder!r}")
    return sub


def push_folder_to_hub(
    write: Callable[[str], Any],
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    what: str = "model",
) -> Any:
    """Create ``repo_id`` if needed, ``write(directory)`` into a temporary directory and upload it in one
    commit through ``huggingface_hub.HfApi``; returns the commit info."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("push_to_hub needs huggingface_hub: pip install 'esm-dual[hub]'") from None
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"push_to_hub: repo_id must be a non-empty string, got {repo_id!r}")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    repo_id = getattr(repo, "repo_id", repo_id)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    with tempfile.TemporaryDirectory(prefix="esm-dual-push-") as tmp:
        write(tmp)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message or f"Upload {what}",
            revision=revision, create_pr=create_pr, token=token)


__all__ = ["CONFIG_ALIASES", "FRAMEWORK_ARGS", "HUB_ARGS", "LoadingArgumentError", "local_subfolder",
           "push_folder_to_hub", "split_pretrained_kwargs"]
