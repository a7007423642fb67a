"""The PyTorch models' integration surface: what transformers' ``Trainer``, PEFT, accelerate and pipelines call
on a model, and the helpers of hub loading and saving. ``PreTrainedMixin`` is a base of ``EsmPreTrainedModel``
(as ``esm_dual/tf/keras_integration.py``'s ``KerasModelMixin`` is of the Keras twin); the model file holds the
twin of the Keras model and nothing of this.

In the mixin: the tied decoder's state-dict hooks and save keys, activation (gradient) checkpointing, input
grads for PEFT, token and FLOP counts, the embedding accessors and resizing, ``device``/``dtype``, the GPU fast
path's per-model options and the loading hook. Module functions: transformers' loading arguments
(``torch_dtype``, ``device_map``, ``attn_implementation``) and ``save_pretrained``'s, as torch values, and the
copy of numpy tensors into a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..common.config import EsmConfig, recorded_dtype
from ..io.dtypes import numpy_to_torch, weights_dtype
from ..io.schema import LoadingError


class PreTrainedMixin:
    """transformers' PyTorch model surface for the ESM models (a base of ``EsmPreTrainedModel``, before
    ``nn.Module``). ``_tied`` (the tied state-dict names), ``base_model``, ``get_input_embeddings``,
    ``num_parameters``, ``tie_weights`` and ``_init_weights`` come from the model."""

    # transformers' class flags (device_map splitting, SDPA, checkpointing) that Trainer, PEFT and accelerate read
    supports_gradient_checkpointing = True
    _no_split_modules = ["EsmLayer", "EsmEmbeddings"]
    _supports_sdpa = True

    def __init__(self) -> None:
        # nn.Module's __init__ by name: esm_dual.pt.hf puts transformers.PreTrainedModel after this class in the
        # MRO, and its __init__ (which wants a transformers config) must not run.
        nn.Module.__init__(self)
        # The tied decoder is left out of state_dict() (safetensors refuses shared tensors: Trainer's checkpoints
        # and torch's save_file) and filled back in by load_state_dict, so either side may hold it.
        self.register_state_dict_post_hook(_drop_tied_on_save)
        self.register_load_state_dict_pre_hook(_fill_tied_on_load)

    # ---- tying and save keys ---------------------------------------------------------------------
    def _tied_keys(self) -> tuple[str, ...]:
        """State-dict names that alias another tensor right now (the decoder tied to the word embeddings)."""
        if not self._tied or not self.config.tie_word_embeddings or not hasattr(self, "lm_head"):
            return ()  # ESMFold has no tied decoder: its lm_head is a plain Linear
        return self._tied if self.lm_head.decoder.weight is self.get_input_embeddings().weight else ()

    @property
    def _keys_to_ignore_on_save(self) -> list[str] | None:
        """HF's name for the keys a saved state dict leaves out (Trainer re-ties them after resuming)."""
        return list(self._tied_keys()) or None

    @property
    def _tied_weights_keys(self) -> dict[str, str] | None:
        """transformers 5's map of tied parameters (target -> source), read by PEFT."""
        if not self._tied_keys():
            return None
        return {"lm_head.decoder.weight": "esm.embeddings.word_embeddings.weight"}

    # ---- training conveniences -----------------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute encoder layers in the backward pass (what Trainer's ``gradient_checkpointing=True``
        calls). ``activation_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (default
        ``use_reentrant=False``); every ``every_n_layers``-th layer is checkpointed; ``offload`` keeps the saved
        activations on the CPU."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        encoder = self.base_model.encoder
        encoder.checkpoint_kwargs = kwargs
        encoder.checkpoint_every_n_layers = every_n_layers
        encoder.checkpoint_offload = bool(offload)
        encoder.gradient_checkpointing = True
        if kwargs.get("use_reentrant"):
            # Reentrant checkpointing only back-propagates when a layer input requires grad (a frozen
            # embedding under PEFT does not): as transformers does, make the embedding output require it.
            self.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      **kwargs: Any) -> None:
        """transformers' older name of ``activation_checkpointing_enable`` (same arguments)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.base_model.encoder.gradient_checkpointing = False

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.base_model.encoder.gradient_checkpointing)

    def enable_input_require_grads(self) -> None:
        """Make the word-embedding output require grad (PEFT with reentrant gradient checkpointing)."""
        def hook(module, inputs, output):
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        handle = self.__dict__.pop("_require_grads_hook", None)
        if handle is not None:
            handle.remove()
    def estimate_tokens(self, input_dict: dict[str, Any]) -> int:
        """Tokens in a batch (``input_ids.numel()``), as transformers estimates them."""
        x = input_dict.get(self.main_input_name) if hasattr(input_dict, "get") else None
        return int(x.numel()) if x is not None and hasattr(x, "numel") else 0

    def floating_point_ops(self, input_dict: dict[str, Any], exclude_embeddings: bool = True) -> int:
        """6 * tokens * parameters (forward + backward), transformers' estimate that Trainer logs."""
        return 6 * self.estimate_tokens(input_dict) * self.num_parameters(exclude_embeddings=exclude_embeddings)

    # ---- embeddings --------------------------------------------------------------------------------
    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embeddings.word_embeddings = value
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Linear | None:
        """The LM decoder (tied to the input embeddings), or None for heads without one."""
        head = getattr(self, "lm_head", None)
        return head.decoder if head is not None else None

    def set_output_embeddings(self, value: nn.Linear) -> None:
        head = getattr(self, "lm_head", None)
        if head is None:
            raise AttributeError(f"{type(self).__name__} has no output embeddings")
        head.decoder = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the vocabulary (after adding tokens to the tokenizer), as transformers does: kept
        rows are copied, new rows get the mean of the old ones (``mean_resizing``) or the init
        distribution; the LM decoder stays tied and its bias is resized; ``config.vocab_size`` follows."""
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        n = old.num_embeddings if new_num_tokens is None else int(new_num_tokens)
        if pad_to_multiple_of is not None:
            if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) \
                    or pad_to_multiple_of <= 0:
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if n <= 0:
            raise ValueError(f"new_num_tokens must be positive, got {n}")
        keep = min(n, old.num_embeddings)
        pad_idx = old.padding_idx if old.padding_idx is not None and old.padding_idx < n else None
        new = nn.Embedding(n, old.embedding_dim, padding_idx=pad_idx, device=old.weight.device,
                           dtype=old.weight.dtype)
        with torch.no_grad():
            self._init_weights(new)
            new.weight[:keep] = old.weight[:keep]
            if n > keep and mean_resizing:
                new.weight[keep:] = old.weight.float().mean(0).to(old.weight.dtype)
        new.weight.requires_grad_(old.weight.requires_grad)
        self.base_model.embeddings.word_embeddings = new
        head = getattr(self, "lm_head", None)
        if head is not None:
            old_bias = head.bias
            bias = nn.Parameter(torch.zeros(n, device=old_bias.device, dtype=old_bias.dtype),
                                requires_grad=old_bias.requires_grad)
            with torch.no_grad():
                bias[:keep] = old_bias[:keep]
            head.bias = bias
            if not self.config.tie_word_embeddings:
                dec = nn.Linear(head.decoder.in_features, n, bias=False, device=old.weight.device,
                                dtype=head.decoder.weight.dtype)
                with torch.no_grad():
                    self._init_weights(dec)
                    dec.weight[:keep] = head.decoder.weight[:keep]
                head.decoder = dec
        self.config.vocab_size = n
        self.tie_weights()
        return new
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- the GPU fast path (esm_dual.pt.fast) ---------------------------------------------------
    @property
    def fast_path_options(self):
        """The base model's ``FastPathOptions``: its own (``set_fast_path``), else the process default read
        from the ``ESM_DUAL_*`` environment."""
        from .fast.options import default_options

        own = self.base_model.__dict__.get("_fast_path")
        return own if own is not None else default_options()

    @fast_path_options.setter
    def fast_path_options(self, options) -> None:
        from .fast.options import FastPathOptions

        if options is not None and not isinstance(options, FastPathOptions):
            raise TypeError(f"fast_path_options takes FastPathOptions or None, got {type(options).__name__}")
        self.base_model._fast_path = options

    def set_fast_path(self, **changes):
        """The base model's fast-path options with ``changes`` (``attn_implementation="sdpa"``,
        ``fused_loop="on"``, ...; see ``FastPathOptions``); returns them."""
        options = self.fast_path_options.replace(**changes)
        self.base_model._fast_path = options
        return options

    @property
    def attn_implementation(self) -> str:
        """"auto": packed varlen attention on CUDA in fp16/bf16, padded SDPA otherwise; "sdpa": always
        padded; "packed": always packed. Short for ``fast_path_options.attn_implementation``."""
        return self.fast_path_options.attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        self.set_fast_path(attn_implementation=value)

    # ---- loading --------------------------------------------------------------------------------
    def _before_loading(self, device: torch.device) -> None:
        """Called by ``from_checkpoint`` between allocation and the tensor copy (ESMFold sets its stem's
        precision here)."""


def _drop_tied_on_save(module: PreTrainedMixin, state_dict: dict[str, Any], prefix: str, local_metadata: Any
                       ) -> None:
    for key in module._tied_keys():
        state_dict.pop(prefix + key, None)


def _fill_tied_on_load(module: PreTrainedMixin, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                       strict: bool, missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]
                       ) -> None:
    base = "" if module.base_model is module else module.base_model_prefix + "."
    embeddings = prefix + base + "embeddings.word_embeddings.weight"
    for key in module._tied_keys():
        if prefix + key not in state_dict and embeddings in state_dict:
            state_dict[prefix + key] = state_dict[embeddings]


def copy_numpy_into(own: dict[str, torch.Tensor], tensors: dict[str, np.ndarray], source: str) -> None:
    """Copy numpy arrays into the model tensors of the same name, checking shapes (names must match)."""
    with torch.no_grad():
        for name, arr in tensors.items():
            target = own[name]
            if tuple(arr.shape) != tuple(target.shape):
                raise LoadingError(f"{source}: tensor {name} has shape {tuple(arr.shape)}, "
                                   f"the model expects {tuple(target.shape)}")
            target.copy_(numpy_to_torch(np.asarray(arr)).to(target.dtype))


def auto_dtype(config: EsmConfig, tensors: dict[str, np.ndarray]) -> torch.dtype | None:
    """``torch_dtype="auto"`` as transformers resolves it: the dtype the config records, else the dtype of
    the first floating weight (rotary ``inv_freq`` tables, kept in float32 in every ESM-2 file, and
    integer buffers do not count)."""
    name = recorded_dtype(config) or weights_dtype(tensors)
    return str_to_torch_dtype(name) if name is not None else None


ATTN_IMPLEMENTATIONS = {"auto": "auto", "sdpa": "sdpa", "eager": "sdpa", "packed": "packed",
                        "flash_attention_2": "packed", "flash_attention_3": "packed"}


def attn_backend(name: Any) -> str | None:
    """transformers' ``attn_implementation`` as esm-dual's back end ("auto", "sdpa" or "packed")."""
    if name is None:
        return None
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r} is not supported; choose one of "
                         f"{', '.join(map(repr, ATTN_IMPLEMENTATIONS))} ('eager' runs the padded SDPA path, which "
                         "gives the same numbers; 'flash_attention_2'/'flash_attention_3' the packed varlen path)")
    return ATTN_IMPLEMENTATIONS[name]


def device_from_map(device_map: Any) -> torch.device:
    """transformers' ``device_map`` when it names one device: a device (str, int, torch.device), "auto"
    (the GPU if there is one, else the CPU) or a dict whose values are all the same device."""
    if isinstance(device_map, dict):
        devices = {str(v) for v in device_map.values()}
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map!r} splits the model over {sorted(devices)}; esm-dual places "
                             "a model on one device (pass one device, or 'auto')")
        device_map = next(iter(device_map.values()))
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, bool):
        raise ValueError(f"device_map={device_map!r} is not a device")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r} is not a device, a dict of one device, or 'auto'") from None


def str_to_torch_dtype(s: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64}
    if s not in table:
        raise ValueError(f"unknown dtype {s!r}; use one of {sorted(table)}")
    return table[s]


SAVE_PUSH_ARGS = ("repo_id", "commit_message", "private", "revision", "create_pr")


def split_save_kwargs(kwargs: dict[str, Any], save_function: Any, variant: str | None, push_to_hub: bool
                      ) -> dict[str, Any]:
    """``save_pretrained``'s transformers arguments: the ``push_to_hub`` ones taken out of ``kwargs`` (returned);
    an unknown one, ``save_function``, ``variant`` or push arguments without ``push_to_hub`` refused by name."""
    push_args = {k: kwargs.pop(k) for k in SAVE_PUSH_ARGS if k in kwargs}
    if kwargs:
        raise TypeError(f"save_pretrained: unexpected argument(s) {', '.join(map(repr, sorted(kwargs)))}")
    if save_function is not None:
        raise ValueError("save_pretrained: save_function is not supported; files are written as safetensors")
    if variant is not None:
        raise ValueError("save_pretrained: variant is not supported; esm-dual writes model.safetensors")
    if push_args and not push_to_hub:
        raise TypeError(f"save_pretrained: {sorted(push_args)} only apply with push_to_hub=True")
    return push_args
