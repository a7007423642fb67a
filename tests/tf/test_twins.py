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

# Keras layers create their variables in build(), torch modules in __init__: any TF class may have it.
KERAS_BUILD = "build"

# Methods only one side has, by PyTorch class name, with the reason.
PT_ONLY_METHODS = {
    # torch's Module._apply casts buffers; Keras variables keep their dtype (inv_freq: autocast=False).
    "EsmRotaryEmbedding": {"_apply"},
    # torch idioms: parameter tying by assignment, the base_model property (a Keras attribute leading back to
    # the model would be a saving cycle: TF has get_base_model), activation checkpointing, device/dtype.
    "EsmPreTrainedModel": {"tie_weights", "base_model", "gradient_checkpointing_enable",
                           "gradient_checkpointing_disable", "device", "dtype",
                           # the rest of transformers' PyTorch surface that Trainer, PEFT and pipelines call:
                           # tying and save keys, activation checkpointing, input grads for PEFT, token/FLOP
                           # counts, the embedding accessors and resizing (torch parameters), the meta-device
                           # build before loading
                           "_tied_keys", "_keys_to_ignore_on_save", "_tied_weights_keys",
                           "activation_checkpointing_enable", "activation_checkpointing_disable",
                           "is_gradient_checkpointing", "enable_input_require_grads", "disable_input_require_grads",
                           "estimate_tokens", "floating_point_ops", "set_input_embeddings",
                           "get_output_embeddings", "set_output_embeddings", "resize_token_embeddings",
                           "_before_loading",
                           # the GPU fast path's options (PyTorch only)
                           "fast_path_options", "set_fast_path", "attn_implementation"},
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
    # names of tied parameters in torch's state dict; transformers' class flags (device_map splitting, SDPA,
    # checkpointing); the PEFT input-grad hook
    "EsmPreTrainedModel": {"_tied", "_no_split_modules", "_supports_sdpa", "supports_gradient_checkpointing",
                           "_require_grads_hook"},
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
# Module-level functions only one side has.
PT_ONLY_FUNCS = {
    "_is_compiling",  # torch.compile
    "copy_numpy_into",  # numpy -> torch tensors; Keras assigns numpy
    "_auto_dtype", "_str_to_torch_dtype",  # torch dtype names (torch_dtype="auto"); Keras takes dtype policies
    # value checks: in Keras they run per backend (eager, TF graph asserts, a JAX host callback): tf/ops.py
    "check_attention_rows",
    "as_tensor_input",  # numpy inputs: Keras converts them itself
    "_drop_tied_on_save", "_fill_tied_on_load",  # torch state-dict hooks for the tied decoder
    "_attn_implementation", "_device_from_map",  # transformers' loading arguments as torch back ends / devices
}
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
