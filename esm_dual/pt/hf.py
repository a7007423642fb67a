"""esm-dual's PyTorch models as ``transformers.PreTrainedModel`` subclasses, for transformers' ``Trainer``.

``Trainer`` calls a model's ``save_pretrained`` only when the model is a ``transformers.PreTrainedModel`` (or a
PEFT model); any other module gets a bare ``model.safetensors`` without ``config.json`` in ``save_model()``
and in every ``checkpoint-N`` (transformers' ``Trainer._save``). The classes here are the models of
``esm_dual.pt`` with ``PreTrainedModel`` added behind them in the MRO: every method is esm-dual's own
(``save_pretrained`` writes ``config.json`` + ``model.safetensors`` in the hub layout, which transformers and
esm-dual both load), and ``isinstance(model, PreTrainedModel)`` holds, so Trainer, PEFT and pipelines treat
them as native models. Importing this module imports transformers (seconds); ``esm_dual.pt`` does not.

    from esm_dual.pt.hf import EsmForSequenceClassification
    model = EsmForSequenceClassification.from_pretrained("facebook/esm2_t6_8M_UR50D", num_labels=2)
"""

from __future__ import annotations

from transformers import PreTrainedModel

from . import modeling_esm


class _HFBase(PreTrainedModel):
    """Class-level defaults for the attributes ``PreTrainedModel.__init__`` would set (it is not run: the
    config is esm-dual's ``EsmConfig``)."""

    use_kernels = False
    kernel_config = None
    hf_quantizer = None
    is_quantized = False
    loss_type = None

    @property
    def all_tied_weights_keys(self) -> dict[str, str]:
        """transformers 5's tied-parameter map (target -> source), read by PEFT."""
        return self._tied_weights_keys or {}

    # transformers' ``PreTrainedModel.post_init`` and ``tie_weights`` are not used: esm-dual's come first.


class EsmModel(modeling_esm.EsmModel, _HFBase):
    __doc__ = modeling_esm.EsmModel.__doc__


class EsmForMaskedLM(modeling_esm.EsmForMaskedLM, _HFBase):
    __doc__ = modeling_esm.EsmForMaskedLM.__doc__


class EsmForSequenceClassification(modeling_esm.EsmForSequenceClassification, _HFBase):
    __doc__ = modeling_esm.EsmForSequenceClassification.__doc__


class EsmForTokenClassification(modeling_esm.EsmForTokenClassification, _HFBase):
    __doc__ = modeling_esm.EsmForTokenClassification.__doc__


__all__ = ["EsmForMaskedLM", "EsmForSequenceClassification", "EsmForTokenClassification", "EsmModel"]
