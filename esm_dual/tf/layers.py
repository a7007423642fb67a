"""Keras layer factories and the serializable base of the ESM sub-layers (every Keras backend).

The model file builds its sub-layers through these factories so that initialisers, dtype policies and
names are set in one place: ``dense``, ``layer_norm`` (float32 under mixed precision), ``embedding``,
``dropout``. ``skip_init`` builds with zeros instead of random values (``from_checkpoint`` then loads or
initialises every tensor, as the PyTorch twin builds on the meta device). ``ConfigLayer`` is the base of
every sub-layer that takes an ``EsmConfig``: its ``get_config``/``from_config`` round-trip the config.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import keras

from ..common.config import EsmConfig

serializable = keras.saving.register_keras_serializable(package="esm_dual")

_SKIP_INIT = [False]


@contextmanager
def skip_init():
    """Build layers with zero initialisers (cheap); every variable is then loaded or initialised."""
    old, _SKIP_INIT[0] = _SKIP_INIT[0], True
    try:
        yield
    finally:
        _SKIP_INIT[0] = old


def init_skipped() -> bool:
    return _SKIP_INIT[0]


def normal_initializer(std: float):
    """N(0, std) (as ``_init_weights`` of the PyTorch twin), or zeros inside ``skip_init``."""
    return "zeros" if _SKIP_INIT[0] else keras.initializers.RandomNormal(0.0, std)


def fp32_policy(policy: keras.DTypePolicy) -> keras.DTypePolicy | str:
    """LayerNorm and the contact head keep float32 under (mixed) half precision."""
    return "float32" if policy.compute_dtype in ("float16", "bfloat16") else policy


def dense(units: int, config: EsmConfig, name: str, parent: keras.layers.Layer, use_bias: bool = True
          ) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=use_bias, kernel_initializer=normal_initializer(config.initializer_range),
                              bias_initializer="zeros", name=name, dtype=parent.dtype_policy)


def layer_norm(config: EsmConfig, name: str, parent: keras.layers.Layer) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, name=name,
                                           dtype=fp32_policy(parent.dtype_policy))


def embedding(num: int, config: EsmConfig, name: str, parent: keras.layers.Layer) -> keras.layers.Embedding:
    return keras.layers.Embedding(num, config.hidden_size,
                                  embeddings_initializer=normal_initializer(config.initializer_range), name=name,
                                  dtype=parent.dtype_policy)


def dropout(rate: float, parent: keras.layers.Layer, name: str = "dropout") -> keras.layers.Dropout:
    return keras.layers.Dropout(rate, name=name, dtype=parent.dtype_policy)


class ConfigLayer(keras.layers.Layer):
    """A sub-layer built from an ``EsmConfig`` (first argument): ``get_config`` stores the config as a
    dict, ``from_config`` rebuilds it, so every ESM layer round-trips Keras serialization."""

    def __init__(self, config: EsmConfig, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = EsmConfig.from_dict(config)
        self.config = config

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        config = dict(config)
        return cls(EsmConfig.from_dict(config.pop("config")), **config)
