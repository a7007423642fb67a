"""Stock transformers ``Trainer`` (no subclass, no callbacks) and PEFT LoRA with esm-dual's models and
tokenizer on ``datasets`` rows; what Trainer writes loads in esm-dual and in transformers with the same outputs."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import esm_dual.pt as plain  # noqa: E402
from esm_dual.common.tokenizer import EsmTokenizer  # noqa: E402
from esm_dual.pt import hf as hfclasses  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.utils import write_hub_heads  # noqa: E402

transformers.utils.logging.set_verbosity_error()
datasets.disable_progress_bars()

SEQS = ["MKTAYIAKQRQISFVK", "MKVLA", "ACDEFGHIKLMNPQ", "WYVTS", "MKKLLPTAAAG", "GSHMAS"]
HEADS = {"mlm": "EsmForMaskedLM", "seq": "EsmForSequenceClassification", "tok": "EsmForTokenClassification",
         "base": "EsmModel"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_hub_heads(tmp_path_factory.mktemp("trainer_hub"), tiny_config("esm2"), seed=4, heads=HEADS)


def dataset(tok, head):
    ds = datasets.Dataset.from_dict({"seq": SEQS, "y": [0, 1, 1, 0, 1, 0]})

    def enc(batch):
        out = tok(batch["seq"])
        if head == "seq":
            out["labels"] = batch["y"]
        elif head == "tok":
            out["labels"] = [[-100] + [ord(c) % 2 for c in s] + [-100] for s in batch["seq"]]
        return out

    return ds.map(enc, batched=True, remove_columns=["seq", "y"])


def collator(tok, head):
    if head == "mlm":
        return transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.3, seed=0)
    if head == "tok":
        return transformers.DataCollatorForTokenClassification(tok)
    return transformers.DataCollatorWithPadding(tok)


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=3, per_device_eval_batch_size=3,
                save_steps=1, report_to=[], use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True,
                dataloader_num_workers=0, learning_rate=1e-2)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def probe(model):
    tok = EsmTokenizer()
    enc = tok(["MKTAY<mask>AKQR", "ACD"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model(**enc)
    return (out.logits if "logits" in out else out.last_hidden_state).float()


def assert_loads_everywhere(directory, head, want):
    """``directory`` loads in esm-dual and in transformers, both giving ``want``; returns the max-abs diffs."""
    ours = getattr(plain, HEADS[head]).from_pretrained(directory)
    ref_cls = getattr(transformers, HEADS[head])
    ref = ref_cls.from_pretrained(directory, **({"add_pooling_layer": False} if head == "base" else {})).eval()
    got_ours, got_ref = probe(ours), probe(ref)
    torch.testing.assert_close(got_ours, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_ref, want, atol=1e-5, rtol=0)
    return float((got_ref - want).abs().max())


@pytest.mark.parametrize("head", ["mlm", "seq", "tok"])
def test_trainer_train_evaluate_predict_checkpoint_resume_save(ckpt, tmp_path, head):
    tok = EsmTokenizer()
    cls = getattr(hfclasses, HEADS[head])
    ds = dataset(tok, head)
    model = cls.from_pretrained(ckpt[head])
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "out"), train_dataset=ds, eval_dataset=ds,
                                   data_collator=collator(tok, head), processing_class=tok)
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert trainer.state.total_flos > 0
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    pred = trainer.predict(ds)
    assert pred.predictions.shape[0] == len(SEQS)
    trainer.save_model(str(tmp_path / "final"))
    want = probe(trainer.model)
    assert_loads_everywhere(str(tmp_path / "final"), head, want)
    ckpt2 = tmp_path / "out" / "checkpoint-2"
    assert (ckpt2 / "config.json").is_file() and (ckpt2 / "optimizer.pt").is_file()
    assert_loads_everywhere(str(ckpt2), head, want)
    assert EsmTokenizer.from_pretrained(str(ckpt2))("MKV") == tok("MKV")

    # Resume: the stock call, on a fresh model; training goes on from step 2.
    fresh = cls.from_pretrained(ckpt[head])
    again = transformers.Trainer(model=fresh, args=args(tmp_path / "out", max_steps=3), train_dataset=ds,
                                 data_collator=collator(tok, head), processing_class=tok)
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 3
    assert (tmp_path / "out" / "checkpoint-3" / "config.json").is_file()


def test_trainer_with_the_plain_classes_trains_checkpoints_and_resumes(ckpt, tmp_path):
    """esm_dual.pt's classes (not PreTrainedModel): Trainer saves their state dict only (its rule); the tied
    decoder no longer breaks safetensors, and resuming re-ties it."""
    tok = EsmTokenizer()
    ds = dataset(tok, "mlm")
    model = plain.EsmForMaskedLM.from_pretrained(ckpt["mlm"])
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "out"), train_dataset=ds,
                                   data_collator=collator(tok, "mlm"), processing_class=tok)
    trainer.train()
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").is_file()
    fresh = plain.EsmForMaskedLM.from_pretrained(ckpt["mlm"])
    again = transformers.Trainer(model=fresh, args=args(tmp_path / "out", max_steps=2), train_dataset=ds,
                                 data_collator=collator(tok, "mlm"), processing_class=tok)
    again.train(resume_from_checkpoint=True)
    assert fresh.lm_head.decoder.weight is fresh.esm.embeddings.word_embeddings.weight
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_trainer_save_model_of_the_encoder(ckpt, tmp_path):
    model = hfclasses.EsmModel.from_pretrained(ckpt["base"])
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "out"))
    trainer.save_model(str(tmp_path / "enc"))
    ref = transformers.EsmModel.from_pretrained(str(tmp_path / "enc")).eval()
    torch.testing.assert_close(probe(ref), probe(model), atol=1e-5, rtol=0)
    torch.testing.assert_close(probe(plain.EsmModel.from_pretrained(str(tmp_path / "enc"))), probe(model))


def _train_once(ckpt, out, **kw):
    tok = EsmTokenizer()
    model = hfclasses.EsmForSequenceClassification.from_pretrained(ckpt["seq"])
    ds = dataset(tok, "seq")
    trainer = transformers.Trainer(model=model, args=args(out, max_steps=1, save_strategy="no", **kw),
                                   train_dataset=ds, data_collator=collator(tok, "seq"))
    trainer.train()
    return trainer


def test_gradient_checkpointing_gives_the_same_step(ckpt, tmp_path):
    plain_run = _train_once(ckpt, tmp_path / "a")
    gc_run = _train_once(ckpt, tmp_path / "b", gradient_checkpointing=True)
    assert gc_run.model.is_gradient_checkpointing
    for (name, a), b in zip(plain_run.model.state_dict().items(), gc_run.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    reentrant = _train_once(ckpt, tmp_path / "c", gradient_checkpointing=True,
                            gradient_checkpointing_kwargs={"use_reentrant": True})
    for (name, a), b in zip(plain_run.model.state_dict().items(), reentrant.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_torch_compile_and_bf16_flags(ckpt, tmp_path):
    run = _train_once(ckpt, tmp_path / "compiled", torch_compile=True, torch_compile_backend="eager")
    assert np.isfinite(run.state.log_history[-1]["train_loss"])
    run.save_model(str(tmp_path / "compiled_final"))
    want = probe(run.model)
    assert_loads_everywhere(str(tmp_path / "compiled_final"), "seq", want)
    try:
        run = _train_once(ckpt, tmp_path / "bf16", bf16=True)
    except ValueError as e:  # a CPU without bf16 support
        pytest.skip(f"bf16 not available here: {e}")
    assert np.isfinite(run.state.log_history[-1]["train_loss"])


# ---- PEFT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["mlm", "seq", "tok"])
def test_peft_lora_under_trainer_saves_reloads_and_merges(ckpt, tmp_path, head):
    peft = pytest.importorskip("peft")
    tok = EsmTokenizer()
    cls = getattr(hfclasses, HEADS[head])
    task = {"mlm": None, "seq": peft.TaskType.SEQ_CLS, "tok": peft.TaskType.TOKEN_CLS}[head]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type=task,
                           init_lora_weights=False)
    model = peft.get_peft_model(cls.from_pretrained(ckpt[head]), lora)
    ds = dataset(tok, head)
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "out", max_steps=2), train_dataset=ds,
                                   data_collator=collator(tok, head), processing_class=tok)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    want = probe(model)
    # Reload: PEFT's documented call with esm-dual's base model.
    base = getattr(plain, HEADS[head]).from_pretrained(ckpt[head])
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(probe(reloaded), want, atol=1e-6, rtol=0)
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    assert_loads_everywhere(str(tmp_path / "merged"), head, want)


# ---- README ----------------------------------------------------------------------------------------
def readme_block(section: str) -> str:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "README.md")
    text = open(path, encoding="utf-8").read()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end != -1 else None]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python block under '## {section}'"
    return blocks[0]


def test_readme_trainer_and_lora_example_runs(ckpt, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    code = readme_block("With HF transformers")
    assert "facebook/esm2_t6_8M_UR50D" in code
    monkeypatch.chdir(tmp_path)
    # The only change: the hub model is replaced by a tiny random checkpoint of the same layout.
    code = code.replace("facebook/esm2_t6_8M_UR50D", ckpt["seq"])
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert os.path.isfile(tmp_path / "esm2-lora" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "esm2-merged" / "config.json")
