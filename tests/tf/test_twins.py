"""The twin rule, enforced (as HF enforces "Copied from"): ``esm_dual/pt/modeling_esm.py`` and
``esm_dual/tf/modeling_esm.py`` define the same classes (``TF`` prefix aside) in the same order, with the same
methods (``forward`` is Keras' ``call``) and the same attribute names, and the same module-level functions.
Every difference is listed below with its reason; a listed difference that no longer exists fails too, so
the list stays true. Read from the source (AST): imports neither framework."""

from __future__ import annotations

import ast
import os

from tests.utils import ROOT

PT_FILE = os.path.join(ROOT, "esm_dual", "pt", "modeling_esm.py")
TF_FILE = os.path.join(ROOT, "esm_dual", "tf", "modeling_esm.py")
# The framework's integration around each twin: a mixin before the framework's base class.
PT_MIXIN = (os.path.join(ROOT, "esm_dual", "pt", "integration.py"), "PreTrainedMixin", "nn.Module")
TF_MIXIN = (os.path.join(ROOT, "esm_dual", "tf", "keras_integration.py"), "KerasModelMixin", "keras.Model")

# Keras layers create their variables in build(), torch modules in __init__: any TF class may have it.
KERAS_BUILD = "build"

# Methods only one side has, by PyTorch class name, with the reason.
PT_ONLY_METHODS = {
    # torch's Module._apply casts buffers; Keras variables keep their dtype (inv_freq: autocast=False).
    "EsmRotaryEmbedding": {"_apply"},
    # torch idioms: parameter tying by assignment (Keras' LM head holds the embedding layer), the base_model
    # property (a Keras attribute leading back to the model would be a saving cycle: TF has get_base_model).
    # transformers' PyTorch surface (checkpointing, PEFT input grads, FLOP counts, embedding resizing, device/dtype,
    # the fast path's options) is PreTrainedMixin's, in pt/integration.py, as Keras' is KerasModelMixin's.
    "EsmPreTrainedModel": {"tie_weights", "base_model"},
    # the packed varlen GPU path (FlashAttention kernels) exists in PyTorch only.
    "EsmModel": {"forward_packed"},
    "EsmForMaskedLM": {"tie_weights", "forward_packed"},
}
TF_ONLY_METHODS = {
    # Keras serialization of layers whose constructor takes more than an EsmConfig.
    "EsmRotaryEmbedding": {"get_config"},
    "EsmContactPredictionHead": {"get_config"},
    "EsmModel": {"get_config"},
    # get_base_model: see base_model above.
    "EsmPreTrainedModel": {"get_base_model"},
    # Keras fit computes the task loss from the logits (compute_loss): the torch forward inlines it.
    "EsmForMaskedLM": {"hf_compute_loss"},
    "EsmForSequenceClassification": {"hf_compute_loss"},
    "EsmForTokenClassification": {"hf_compute_loss"},
}
# Attributes (self.x = ..., class-level names) only one side has.
PT_ONLY_ATTRS = {
    # names of tied parameters in torch's state dict (Keras shares the embedding layer: no names)
    "EsmPreTrainedModel": {"_tied"},
    # activation checkpointing (torch.utils.checkpoint), set through PreTrainedMixin's checkpointing API
    "EsmEncoder": {"gradient_checkpointing", "checkpoint_every_n_layers", "checkpoint_kwargs",
                   "checkpoint_offload"},
    "EsmModel": {"_fast_path"},  # the GPU fast path's per-model options
    "EsmAttention": {"output"},  # Keras: output_layer (``output`` is a read-only Keras property)
    "EsmLayer": {"output"},
}
TF_ONLY_ATTRS = {
    "EsmRotaryEmbedding": {"dim", "base"},  # get_config; torch computes the table in __init__
    "EsmSelfAttention": {"dropout"},  # Keras' Dropout layer (seeded per layer); torch: F.dropout(dropout_prob)
    "EsmAttention": {"output_layer"},
    "EsmLayer": {"output_layer"},
    "EsmContactPredictionHead": {"in_features", "initializer_range"},  # get_config
    "EsmModel": {"add_pooling_layer"},  # get_config
    # Keras metrics count only positions with a target in these heads (labels -100 elsewhere).
    "EsmForMaskedLM": {"_labels_ignore_index"},
    "EsmForTokenClassification": {"_labels_ignore_index"},
}
# Module-level functions only one side has (framework idioms, value checks and loading helpers live in pt/ops.py,
# pt/integration.py, tf/ops.py, tf/layers.py ...).
PT_ONLY_FUNCS: set[str] = set()
TF_ONLY_FUNCS: set[str] = set()


def _parse(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    classes, funcs = [], []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            methods, attrs = [], set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    methods.append("forward" if item.name == "call" else item.name)
                    for sub in ast.walk(item):
                        targets = sub.targets if isinstance(sub, ast.Assign) else \
                            [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else []
                        for t in targets:
                            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                                if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) \
                                        and el.value.id == "self":
                                    attrs.add(el.attr)
                elif isinstance(item, ast.Assign):
                    attrs.update(t.id for t in item.targets if isinstance(t, ast.Name))
            classes.append((node.name, methods, attrs))
        elif isinstance(node, ast.FunctionDef):
            funcs.append(node.name)
    return classes, funcs


def test_same_classes_in_the_same_order():
    pt, _ = _parse(PT_FILE)
    tf, _ = _parse(TF_FILE)
    assert all(name.startswith("TF") for name, _, _ in tf)
    assert [name[2:] for name, _, _ in tf] == [name for name, _, _ in pt]


def test_same_methods_and_attributes_or_a_listed_reason():
    pt = {name: (methods, attrs) for name, methods, attrs in _parse(PT_FILE)[0]}
    tf = {name[2:]: (methods, attrs) for name, methods, attrs in _parse(TF_FILE)[0]}
    problems = []
    for name in pt:
        pm, pa = pt[name]
        tm, ta = tf[name]
        diffs = {
            "PT_ONLY_METHODS": (set(pm) - set(tm), PT_ONLY_METHODS.get(name, set())),
            "TF_ONLY_METHODS": (set(tm) - set(pm) - {KERAS_BUILD}, TF_ONLY_METHODS.get(name, set())),
            "PT_ONLY_ATTRS": (pa - ta, PT_ONLY_ATTRS.get(name, set())),
            "TF_ONLY_ATTRS": (ta - pa, TF_ONLY_ATTRS.get(name, set())),
        }
        for table, (found, listed) in diffs.items():
            if found != listed:
                problems.append(f"{name}: {table} differs: unlisted {sorted(found - listed)}, "
                                f"listed but gone {sorted(listed - found)}")
        # shared methods in the same order
        shared = [m for m in pm if m in tm]
        if [m for m in tm if m in pm] != shared:
            problems.append(f"{name}: methods in another order: pt {shared}, tf {[m for m in tm if m in pm]}")
    assert not problems, "\n".join(problems)


def test_same_module_functions_in_the_same_order():
    pt = [f for f in _parse(PT_FILE)[1]]
    tf = [f for f in _parse(TF_FILE)[1]]
    assert set(pt) - set(tf) == PT_ONLY_FUNCS
    assert set(tf) - set(pt) == TF_ONLY_FUNCS
    assert [f for f in pt if f in tf] == [f for f in tf if f in pt]


def _class_names(path, cls):
    """Methods and class-level names that class ``cls`` of the file at ``path`` defines, and its bases."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    names = {item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for item in node.body:
        if isinstance(item, ast.Assign):
            names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return names - {"__init__"}, [ast.unparse(b) for b in node.bases]


def test_each_base_model_is_its_frameworks_mixin_then_the_framework():
    """The integration surface sits in one mixin per framework, first among the bases; the model's base class
    and its mixin define no name twice (a method moved back into the model file would silently win)."""
    for model_file, prefix, (mixin_file, mixin, framework) in ((PT_FILE, "", PT_MIXIN), (TF_FILE, "TF", TF_MIXIN)):
        own, bases = _class_names(model_file, f"{prefix}EsmPreTrainedModel")
        assert bases == [mixin, framework]
        mixin_names, _ = _class_names(mixin_file, mixin)
        assert mixin_names, mixin
        assert not own & mixin_names, f"{prefix}EsmPreTrainedModel and {mixin} both define {sorted(own & mixin_names)}"
