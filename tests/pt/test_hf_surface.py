"""The HF model surface of the PyTorch models, exercised through the real transformers / torch / onnx code:
outputs (ModelOutput behaviour, pytree), torch.export / ONNX / torch.compile on the models themselves,
pipelines, parameter counts, embeddings, resizing, save_pretrained's arguments, push_to_hub, from_pretrained's
loading arguments, and the input checks of issue 19.13."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from esm_dual.common.hf_hub import LoadingArgumentError  # noqa: E402
from esm_dual.common.outputs import MaskedLMOutput  # noqa: E402
from esm_dual.common.tokenizer import EsmTokenizer  # noqa: E402
from esm_dual.io.base import CheckpointError  # noqa: E402
from esm_dual.pt import (  # noqa: E402
    EsmForMaskedLM,
    EsmForSequenceClassification,
    EsmForTokenClassification,
    EsmModel,
)
from tests.conftest import make_batch, tiny_config  # noqa: E402
from tests.utils import hf_model, write_hub_checkpoint, write_hub_heads  # noqa: E402

transformers.utils.logging.set_verbosity_error()
CLASSES = {"base": EsmModel, "mlm": EsmForMaskedLM, "seq": EsmForSequenceClassification,
           "tok": EsmForTokenClassification}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_hub_heads(tmp_path_factory.mktemp("hub"), tiny_config("esm2"), seed=1)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """One encoder layer: graph capture and ONNX translation time grow with the layers."""
    return write_hub_heads(tmp_path_factory.mktemp("hub1"), tiny_config("esm2", num_hidden_layers=1), seed=1,
                           heads=("base", "mlm"))


# ---- outputs ---------------------------------------------------------------------------------------
def test_outputs_behave_like_hf_model_output():
    logits = torch.ones(2, 3)
    out = MaskedLMOutput(logits=logits)
    assert out.logits is logits and out["logits"] is logits and out[0] is logits
    assert out.to_tuple() == (logits,) and list(out.keys()) == ["logits"]
    out["loss"] = torch.tensor(1.0)  # a field: set, and first in order
    assert out.loss is not None and out[0] is out.loss and out.to_tuple()[1] is logits
    out["input_ids"] = torch.zeros(2, 3)  # a new key, as the fill-mask pipeline stores
    assert "input_ids" in out and out.input_ids is out["input_ids"] and out.keys()[-1] == "input_ids"
    with pytest.raises(KeyError):
        out["hidden_states"]
    with pytest.raises(AttributeError):
        getattr(out, "nothing")  # noqa: B009


def test_outputs_are_pytree_nodes():
    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

    out = MaskedLMOutput(loss=torch.tensor(2.0), logits=torch.ones(2, 3))
    leaves, spec = tree_flatten(out)
    assert len(leaves) == 2
    back = tree_unflatten([x * 2 for x in leaves], spec)
    assert isinstance(back, MaskedLMOutput) and torch.equal(back.logits, torch.full((2, 3), 2.0))
    assert isinstance(tree_map(lambda t: t + 1, out), MaskedLMOutput)


# ---- export, ONNX, compile ---------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["base"])  # EsmForMaskedLM goes through torch.export in the ONNX test below
def test_torch_export_dynamic_batch_and_length(one_layer, head):
    model = CLASSES[head].from_pretrained(one_layer[head])
    ids, mask = make_batch(lengths=(9, 5, 12))
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    B, L = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=3, max=1024)
    ep = torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask},
                             dynamic_shapes={"input_ids": {0: B, 1: L}, "attention_mask": {0: B, 1: L}})
    field = "last_hidden_state" if head == "base" else "logits"
    for lengths in ((9, 5, 12), (4, 20), (7,)):
        ids2, mask2 = (torch.from_numpy(a) for a in make_batch(seed=3, lengths=lengths))
        got = ep.module()(input_ids=ids2, attention_mask=mask2)
        want = model(input_ids=ids2, attention_mask=mask2)
        assert type(got) is type(want)
        torch.testing.assert_close(got[field], want[field], atol=1e-5, rtol=0)


def test_onnx_export_dynamo_runs_in_onnxruntime(one_layer, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = EsmForMaskedLM.from_pretrained(one_layer["mlm"])
    ids, mask = (torch.from_numpy(a) for a in make_batch(lengths=(9, 5, 12)))
    path = str(tmp_path / "mlm.onnx")
    torch.onnx.export(model, (), path, kwargs={"input_ids": ids, "attention_mask": mask}, dynamo=True,
                      dynamic_shapes={"input_ids": {0: "batch", 1: "length"},
                                      "attention_mask": {0: "batch", 1: "length"}},
                      optimize=False, verbose=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for lengths in ((9, 5, 12), (3, 17)):
        a, m = make_batch(seed=5, lengths=lengths)
        (got, *_) = sess.run(None, dict(zip(names, (a, m))))
        want = model(input_ids=torch.from_numpy(a), attention_mask=torch.from_numpy(m)).logits.detach().numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_torch_compile_on_the_model(ckpt):
    model = EsmForMaskedLM.from_pretrained(ckpt["mlm"])
    ids, mask = (torch.from_numpy(a) for a in make_batch(lengths=(6, 4)))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    got = compiled(input_ids=ids, attention_mask=mask, labels=ids)
    want = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert isinstance(got, MaskedLMOutput)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)


# ---- pipelines ---------------------------------------------------------------------------------------
def test_fill_mask_and_feature_extraction_pipelines_match_hf(ckpt):
    tok = EsmTokenizer()
    ref_tok = transformers.EsmTokenizer.from_pretrained(_hf_tok_dir(ckpt))
    text = "MKTAY<mask>AKQR"
    ours = transformers.pipeline("fill-mask", model=EsmForMaskedLM.from_pretrained(ckpt["mlm"]), tokenizer=tok,
                                 top_k=5)(text)
    ref = transformers.pipeline("fill-mask", model=hf_model(ckpt["mlm"], "mlm"), tokenizer=ref_tok, top_k=5)(text)
    assert [r["token_str"] for r in ours] == [r["token_str"] for r in ref]
    assert [r["sequence"] for r in ours] == [r["sequence"] for r in ref]
    np.testing.assert_allclose([r["score"] for r in ours], [r["score"] for r in ref], atol=1e-6)

    ours = transformers.pipeline("feature-extraction", model=EsmModel.from_pretrained(ckpt["base"]),
                                 tokenizer=tok)(["MKTAYIAKQR", "MKV"])
    ref_model = transformers.EsmModel.from_pretrained(ckpt["base"], add_pooling_layer=False).eval()
    ref = transformers.pipeline("feature-extraction", model=ref_model, tokenizer=ref_tok)(["MKTAYIAKQR", "MKV"])
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _hf_tok_dir(ckpt):
    d = os.path.join(os.path.dirname(ckpt["mlm"]), "tokenizer")
    if not os.path.isdir(d):
        EsmTokenizer().save_pretrained(d)
    return d


# ---- parameter counts, embeddings, resizing --------------------------------------------------------
@pytest.mark.parametrize("head", ["base", "mlm", "seq", "tok"])
def test_num_parameters_match_transformers(ckpt, head):
    ours = CLASSES[head].from_pretrained(ckpt[head])
    ref = hf_model(ckpt[head], head)
    for kw in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert ours.num_parameters(**kw) == ref.num_parameters(**kw), kw
    ours.freeze_base_model()
    for p in ref.base_model.parameters():
        p.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == ref.num_parameters(only_trainable=True)
    batch = {"input_ids": torch.ones(2, 7, dtype=torch.long)}
    # transformers 5 dropped floating_point_ops from its models; Trainer computes the same product itself.
    assert ours.floating_point_ops(batch) == 6 * 14 * ref.num_parameters(exclude_embeddings=True)


def test_embedding_accessors_and_resize_keep_the_decoder_tied(ckpt, tmp_path):
    model = EsmForMaskedLM.from_pretrained(ckpt["mlm"])
    emb = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is emb.weight
    old = emb.weight.detach().clone()
    new = model.resize_token_embeddings(40)
    assert new.num_embeddings == 40 and model.config.vocab_size == 40
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.lm_head.bias.shape == (40,)
    torch.testing.assert_close(new.weight[:33], old)
    ids, mask = (torch.from_numpy(a) for a in make_batch(lengths=(5, 3)))
    ids[0, 2] = 39
    assert model(input_ids=ids, attention_mask=mask).logits.shape[-1] == 40
    model.save_pretrained(tmp_path / "resized")
    back = EsmForMaskedLM.from_pretrained(tmp_path / "resized")
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    ref = transformers.EsmForMaskedLM.from_pretrained(tmp_path / "resized").eval()
    torch.testing.assert_close(ref(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    assert model.resize_token_embeddings(41, pad_to_multiple_of=8).num_embeddings == 48
    replacement = torch.nn.Embedding(48, model.config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement and model.lm_head.decoder.weight is replacement.weight
    seq = EsmForSequenceClassification.from_pretrained(ckpt["seq"])
    assert seq.get_output_embeddings() is None


def test_state_dict_leaves_out_the_tied_decoder_and_loads_back(ckpt):
    model = EsmForMaskedLM.from_pretrained(ckpt["mlm"])
    sd = model.state_dict()
    assert "lm_head.decoder.weight" not in sd
    assert model._keys_to_ignore_on_save == ["lm_head.decoder.weight"]
    other = EsmForMaskedLM(model.config)
    other.load_state_dict(sd)  # strict: the tied key is filled in
    assert other.lm_head.decoder.weight is other.esm.embeddings.word_embeddings.weight
    torch.testing.assert_close(other.lm_head.decoder.weight, model.lm_head.decoder.weight)
    ref = hf_model(ckpt["mlm"], "mlm")
    other.load_state_dict(ref.state_dict(), strict=False)  # transformers' state dict holds the decoder
    untied = EsmForMaskedLM(tiny_config("esm2", tie_word_embeddings=False))
    assert "lm_head.decoder.weight" in untied.state_dict() and untied._keys_to_ignore_on_save is None


# ---- save_pretrained / push_to_hub ---------------------------------------------------------------
def test_save_pretrained_arguments(ckpt, tmp_path):
    model = EsmForSequenceClassification.from_pretrained(ckpt["seq"])
    ids, mask = (torch.from_numpy(a) for a in make_batch(lengths=(5, 3)))
    want = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    sd = {k: v * 0 if k == "classifier.out_proj.bias" else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sd", state_dict=sd, safe_serialization=True)
    back = EsmForSequenceClassification.from_pretrained(tmp_path / "sd")
    assert torch.count_nonzero(back.classifier.out_proj.bias) == 0
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    for d in ("sharded", "bin"):
        got = EsmForSequenceClassification.from_pretrained(tmp_path / d)(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want)
        ref = transformers.EsmForSequenceClassification.from_pretrained(tmp_path / d).eval()
        torch.testing.assert_close(ref(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="bogus"):
        model.save_pretrained(tmp_path / "x", bogus=1)


class FakeHfApi:
    """huggingface_hub.HfApi replaced by a local fake: repos are directories under `root`."""

    root = None
    calls: list = []

    def __init__(self, token=None, **kwargs):
        FakeHfApi.calls.append(("init", token))

    def create_repo(self, repo_id, private=None, exist_ok=False, token=None, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, private, token))
        os.makedirs(os.path.join(self.root, repo_id), exist_ok=True)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, branch, exist_ok=False, token=None, **kwargs):
        FakeHfApi.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, create_pr=False, token=None,
                      **kwargs):
        import shutil

        FakeHfApi.calls.append(("upload_folder", repo_id, commit_message, revision, token))
        dst = os.path.join(self.root, repo_id)
        for name in os.listdir(folder_path):
            shutil.copy(os.path.join(folder_path, name), os.path.join(dst, name))
        return "commit-info"


def test_push_to_hub_through_huggingface_hub(ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    FakeHfApi.root, FakeHfApi.calls = str(tmp_path / "hub"), []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    model = EsmForMaskedLM.from_pretrained(ckpt["mlm"])
    assert model.push_to_hub("me/tiny", token="hf_SECRET", private=True, commit_message="first") == "commit-info"
    repo = tmp_path / "hub" / "me" / "tiny"
    assert {"config.json", "model.safetensors"} <= set(os.listdir(repo))
    assert ("upload_folder", "me/tiny", "first", None, "hf_SECRET") in FakeHfApi.calls
    for name in os.listdir(repo):
        assert b"hf_SECRET" not in (repo / name).read_bytes()
    ids, mask = (torch.from_numpy(a) for a in make_batch(lengths=(5, 3)))
    torch.testing.assert_close(EsmForMaskedLM.from_pretrained(repo)(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/other", token="hf_SECRET")
    assert (tmp_path / "hub" / "me" / "other" / "config.json").is_file()
    EsmTokenizer().push_to_hub("me/tiny", token="hf_SECRET")
    assert (repo / "vocab.txt").is_file()


# ---- from_pretrained's loading arguments -------------------------------------------------------------
def _fake_snapshot_download(monkeypatch, local_dir, seen):
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        seen.append({"repo_id": repo_id, **kwargs})
        if kwargs.get("local_files_only") and not kwargs.get("_cached", True):
            raise FileNotFoundError("not cached")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_from_pretrained_passes_hub_arguments_to_huggingface_hub(ckpt, tmp_path, monkeypatch):
    repo = tmp_path / "snapshot"
    write_hub_checkpoint(str(repo / "sub"), tiny_config("esm2"), "mlm", seed=1)
    seen = []
    _fake_snapshot_download(monkeypatch, str(repo), seen)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = EsmForMaskedLM.from_pretrained("someone/tiny-esm", revision="v2", cache_dir=str(tmp_path / "cache"),
                                           token="hf_SECRET", force_download=True, subfolder="sub")
    call = seen[0]
    assert call["repo_id"] == "someone/tiny-esm" and call["revision"] == "v2" and call["token"] == "hf_SECRET"
    assert call["cache_dir"] == str(tmp_path / "cache") and call["force_download"] is True
    assert all(p.startswith("sub/") for p in call["allow_patterns"])
    ref = EsmForMaskedLM.from_pretrained(str(repo / "sub"))
    ids, mask = (torch.from_numpy(a) for a in make_batch(lengths=(5, 3)))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               ref(input_ids=ids, attention_mask=mask).logits)
    seen.clear()
    EsmForMaskedLM.from_pretrained("someone/tiny-esm", local_files_only=True, subfolder="sub")
    assert seen[0]["local_files_only"] is True
    # Nothing of the loading arguments reaches the config or the saved files.
    model.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "hf_SECRET" not in json.dumps(cfg)
    for word in ("revision", "cache_dir", "subfolder", "force_download", "token", "local_files_only"):
        assert word not in cfg
    assert "hf_SECRET" not in (tmp_path / "saved" / "model.safetensors").read_bytes().decode("latin-1")


def test_hub_errors_name_the_repo_and_hide_the_token(tmp_path, monkeypatch):
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        raise OSError(f"401 for {repo_id} with token {kwargs.get('token')}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError) as e:
        EsmForMaskedLM.from_pretrained("someone/private-esm", token="hf_SECRET", revision="main")
    assert "someone/private-esm" in str(e.value) and "hf_SECRET" not in str(e.value)


def test_local_subfolder_device_map_and_attn_implementation(ckpt, tmp_path):
    write_hub_checkpoint(str(tmp_path / "outer" / "inner"), tiny_config("esm2"), "seq", seed=2)
    model = EsmForSequenceClassification.from_pretrained(tmp_path / "outer", subfolder="inner", device_map="auto",
                                                         attn_implementation="eager")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.esm.attn_implementation == "sdpa"
    assert EsmModel.from_pretrained(ckpt["base"], device_map="cpu").device.type == "cpu"
    assert EsmModel.from_pretrained(ckpt["base"], device_map={"": "cpu"}).device.type == "cpu"
    assert EsmModel.from_pretrained(ckpt["base"], attn_implementation="flash_attention_2").attn_implementation == \
        "packed"
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*'sdpa'"):
        EsmModel.from_pretrained(ckpt["base"], attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="one device"):
        EsmModel.from_pretrained(ckpt["base"], device_map={"esm.encoder": "cpu", "lm_head": "cuda:0"})
    with pytest.raises(FileNotFoundError, match="nope"):
        EsmModel.from_pretrained(tmp_path / "outer", subfolder="nope")


def test_unknown_from_pretrained_argument_is_named(ckpt):
    with pytest.raises(LoadingArgumentError, match="'output_loading_info'"):
        EsmForMaskedLM.from_pretrained(ckpt["mlm"], output_loading_info=True)
    with pytest.raises(LoadingArgumentError, match="'hidden_dropout'"):
        EsmForMaskedLM.from_pretrained(ckpt["mlm"], hidden_dropout=0.3)
    with pytest.raises(LoadingArgumentError, match="'add_pooling_layer'"):
        EsmForMaskedLM.from_pretrained(ckpt["mlm"], add_pooling_layer=False)
    assert EsmModel.from_pretrained(ckpt["base"], add_pooling_layer=False).pooler is None
    model = EsmForSequenceClassification.from_pretrained(ckpt["seq"], problem_type="regression",
                                                         hidden_dropout_prob=0.2, trust_remote_code=True)
    assert model.config.problem_type == "regression" and model.config.hidden_dropout_prob == 0.2
    assert "trust_remote_code" not in model.config.to_json_string()


# ---- 19.13: inputs ------------------------------------------------------------------------------------
def test_all_zero_attention_mask_row_is_a_clear_error(ckpt):
    model = EsmForMaskedLM.from_pretrained(ckpt["mlm"])
    ids, mask = (torch.from_numpy(a) for a in make_batch(lengths=(5, 3, 4)))
    mask[1] = 0
    with pytest.raises(ValueError, match=r"attention_mask: row 1 .*no real token"):
        model(input_ids=ids, attention_mask=mask)
    ids[2] = model.config.pad_token_id
    with pytest.raises(ValueError, match=r"input_ids.*row 2"):
        model(input_ids=ids)


def test_numpy_inputs_are_accepted(ckpt):
    model = EsmForTokenClassification.from_pretrained(ckpt["tok"])
    ids, mask = make_batch(lengths=(5, 3))
    labels = np.where(mask == 1, 1, -100)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 labels=torch.from_numpy(labels))
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    enc = EsmTokenizer()(["MKV", "MKTAYIAK"], padding=True, return_tensors="np")
    model(**enc)
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor or a numpy array, got list"):
        model(input_ids=[[0, 5, 2]])


def test_config_json_written_by_save_pretrained_is_plain(ckpt, tmp_path):
    model = EsmForMaskedLM.from_pretrained(ckpt["mlm"], device_map="cpu", revision=None)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "device_map" not in cfg and "revision" not in cfg
