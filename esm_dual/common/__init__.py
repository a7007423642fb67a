"""Framework-neutral parts of esm-dual: imports neither torch nor TensorFlow."""

from .config import ConfigError, EsmConfig, EsmFoldConfig, StructureModuleConfig, TrunkConfig

__all__ = ["ConfigError", "EsmConfig", "EsmFoldConfig", "StructureModuleConfig", "TrunkConfig"]
