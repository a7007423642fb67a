"""Hub tensor names of the Keras model's variables: one generic walk plus a short exception table.

The path of a variable is the chain of layer names below the model (the hub's attribute names; list items
``layer_3`` are ``layer.3``); the leaf comes from the Keras layer class (Dense ``kernel`` <-> ``weight``
transposed, LayerNorm ``gamma``/``beta`` <-> ``weight``/``bias``, Embedding ``embeddings`` <-> ``weight``) or,
for variables our own layers create, from ``EXCEPTION_NAMES`` (filled in by the model file).
"""

from __future__ import annotations

import re

import keras

# Keras layer class -> {variable name: (hub leaf name, transposed)}; Dense kernels are [in, out] in
# Keras and [out, in] (``Linear.weight``) in the hub files.
GENERIC_NAMES: dict[type, dict[str, tuple[str, bool]]] = {
    keras.layers.Dense: {"kernel": ("weight", True), "bias": ("bias", False)},
    keras.layers.LayerNormalization: {"gamma": ("weight", False), "beta": ("bias", False)},
    keras.layers.Embedding: {"embeddings": ("weight", False)},
}
# Variables our own layers create directly: registered by the model file next to the classes.
EXCEPTION_NAMES: dict[type, dict[str, tuple[str, bool]]] = {}
_LIST_ITEM = re.compile(r"^(.*)_(\d+)$")


def hub_names(cls: type, table: dict[str, tuple[str, bool]]) -> type:
    """Register the hub names of the variables a layer class creates itself (decorator-style helper)."""
    EXCEPTION_NAMES[cls] = table
    return cls


def hub_component(layer_name: str) -> str:
    """A layer's name as a hub path component: list items ``layer_3`` are ``layer.3``."""
    m = _LIST_ITEM.match(layer_name)
    return f"{m.group(1)}.{m.group(2)}" if m else layer_name


def child_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Direct sub-layers held in public attributes (and lists of them), in assignment order (on the PyTorch
    backend single sub-layers sit in torch's module registry, after the lists)."""
    out, seen = [], set()
    items = list(vars(layer).items())
    if isinstance(layer, keras.layers.Layer) and hasattr(layer, "named_children"):
        items += list(layer.named_children())
    for attr, value in items:
        if attr.startswith("_"):
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                seen.add(id(item))
                out.append(item)
    return out


def hub_variable_map(model: keras.layers.Layer) -> dict[str, tuple[keras.Variable, bool]]:
    """Hub tensor name -> (Keras variable, transposed) for every weight of ``model``.

    A variable reached twice (the LM decoder tied to the word embeddings) keeps its first name, so the
    tied decoder is left out as in hub files.
    """
    out: dict[str, tuple[keras.Variable, bool]] = {}
    seen: set[int] = set()

    def visit(layer: keras.layers.Layer, prefix: str) -> None:
        children = child_layers(layer)
        below = {id(w) for c in children for w in c.weights}
        table = next((t for cls, t in {**GENERIC_NAMES, **EXCEPTION_NAMES}.items() if type(layer) is cls), {})
        for var in layer.weights:
            if id(var) in below or id(var) in seen:
                continue
            seen.add(id(var))
            if var.name not in table:
                raise KeyError(f"no hub name for variable {var.path!r} of {type(layer).__name__}")
            leaf, transposed = table[var.name]
            out[prefix + leaf] = (var, transposed)
        for child in children:
            visit(child, prefix + hub_component(child.name) + ".")

    visit(model, "")
    return out
