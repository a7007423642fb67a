"""Checkpoint formats, one module per format, and what they share.

* :mod:`~esm_dual.io.base`: the in-memory ``Checkpoint`` (config + ``{hub name: np.ndarray}``), ``CheckpointError``;
* :mod:`~esm_dual.io.dtypes`: bfloat16 and friends, casting rules, the numpy <-> torch converter;
* :mod:`~esm_dual.io.safetensors`: the safetensors reader (validated header) and writer;
* :mod:`~esm_dual.io.torch_pickle`: ``.bin``/``.pt`` through the allowlisted ``torch.load``, nothing executed;
* :mod:`~esm_dual.io.hub`: the HF hub layout, ``load_checkpoint`` / ``save_checkpoint``;
* :mod:`~esm_dual.io.fair_esm`: fair-esm ``.pt`` files (one reader, one writer);
* :mod:`~esm_dual.io.tf_h5`: transformers 4.x's ``tf_model.h5``;
* :mod:`~esm_dual.io.keras_hub`: keras-hub ESM presets;
* :mod:`~esm_dual.io.resolve`: preset names and hub ids -> local paths (downloads);
* :mod:`~esm_dual.io.schema`: the tensor inventory (shapes a config implies) and the matching of a checkpoint's
  tensors to a model's.

Nothing here imports torch or TensorFlow at import time. Import from the submodules; this package imports none
of them itself.
"""
