"""One command line: every command takes the model as --model / --model-location (info and convert also as a
positional), fair-esm's own forms (`embed MODEL FASTA OUT` as esm-extract, `fold -i -o` as esm-fold), usage
errors point at the subcommand's --help, --unknown-residues on every command that reads sequences, progress
lines in logs (no carriage returns), and -q silences the frameworks' log lines."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from esm_dual.common.embeddings import EmbeddingStore
from tests.conftest import tiny_config
from tests.utils import ROOT, run_cli, write_hub_checkpoint

SEQS = {"p1": "MKTAYIAKQRQISFVKSHFSRQ", "p2": "GSHMLEDPVK", "p3": "MKVLAAGIVGLLLAA"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("args_model") / "tiny"
    write_hub_checkpoint(str(d), tiny_config("esm2", intermediate_size=72), "mlm", seed=4)
    return str(d)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    p = tmp_path_factory.mktemp("args_fasta") / "in.fasta"
    p.write_text("".join(f">{k}\n{v}\n" for k, v in SEQS.items()))
    return str(p)


def _means(path):
    with EmbeddingStore(str(path)) as s:
        return {k: np.asarray(s[k]["mean"][3]) for k in s.ids}


def test_embed_model_forms_agree(tmp_path, capsys, model, fasta, one_torch_thread):
    forms = {
        "option": ["embed", fasta, tmp_path / "a.h5", "--model", model],
        "model_location": ["embed", fasta, tmp_path / "b.h5", "--model-location", model],
        "option_between": ["embed", fasta, "-m", model, tmp_path / "c.h5"],
        "esm_extract": ["embed", model, fasta, tmp_path / "d.h5"],
    }
    results = {}
    for name, argv in forms.items():
        rc, _, err = run_cli(capsys, *argv, "-q")
        assert rc == 0, (name, err)
        results[name] = _means(argv[[i for i, a in enumerate(argv) if str(a).endswith(".h5")][0]])
    ref = results.pop("option")
    assert sorted(ref) == sorted(SEQS)
    for name, got in results.items():
        assert all(np.array_equal(ref[k], got[k]) for k in ref), name


def test_usage_errors_point_at_the_subcommand_help(tmp_path, capsys, model, fasta):
    rc, _, err = run_cli(capsys, "embed", fasta, tmp_path / "x.h5")
    assert rc == 2 and "--model" in err and "esm-dual embed --help" in err
    rc, _, err = run_cli(capsys, "embed", fasta, tmp_path / "x.h5", "--model", model, "--no-such-flag")
    assert rc == 2 and "unrecognized arguments: --no-such-flag" in err and "esm-dual embed --help" in err
    rc, _, err = run_cli(capsys, "embed", model, fasta, tmp_path / "x.h5", "extra", "--model", model)
    assert rc == 2 and "unexpected argument" in err and "esm-dual embed --help" in err
    rc, _, err = run_cli(capsys, "fold", "--bogus")
    assert rc == 2 and "esm-dual fold --help" in err
    rc, _, err = run_cli(capsys, "convert", model)
    assert rc == 2 and "missing DST" in err and "esm-dual convert --help" in err
    rc, _, err = run_cli(capsys, "info", model, "--model", model)
    assert rc == 2 and "esm-dual info --help" in err
    assert not (tmp_path / "x.h5").exists()


def test_info_and_convert_take_model_options(tmp_path, capsys, model):
    outs = [run_cli(capsys, "info", *form, "--json") for form in ([model], ["--model", model], ["--model-location",
                                                                                             model])]
    assert all(rc == 0 for rc, _, _ in outs) and len({out for _, out, _ in outs}) == 1
    rc, _, err = run_cli(capsys, "convert", "--model-location", model, tmp_path / "copy", "--to", "hf", "-q")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "copy")) == ["config.json", "model.safetensors"]


def test_unknown_residues_embed(tmp_path, capsys, model, one_torch_thread):
    from esm_dual import EsmTokenizer

    fa = tmp_path / "lower.fasta"
    fa.write_text(">ok\nMKTAYIAK\n>bad\nMKtaYI*K\n")
    rc, _, err = run_cli(capsys, "embed", fa, tmp_path / "e.h5", "-m", model, "-q")
    assert rc == 2 and "record 'bad', residue 3" in err and "lower-case 't'" in err
    assert "--unknown-residues unk" in err
    rc, _, err = run_cli(capsys, "embed", fa, tmp_path / "u.h5", "-m", model, "-q", "--unknown-residues", "unk",
                         "--include", "per_tok")
    assert rc == 0, err
    with EmbeddingStore(str(tmp_path / "u.h5")) as s:
        n = s["bad"]["per_tok"][3].shape[0]
    # HF's tokenizer: the run 'ta' is one <unk>, '*' another
    hf_ids = EsmTokenizer()("MKtaYI*K", add_special_tokens=False)["input_ids"]
    assert n == len(hf_ids) == 7 and hf_ids.count(EsmTokenizer().unk_token_id) == 2


def test_unknown_residues_fold_sequences():
    from esm_dual.cli.fold import check_sequence
    from esm_dual.cli.main import main as _  # noqa: F401  (import-light module)

    assert check_sequence("r", "MKXBZ:GSHM") == "MKXBZ:GSHM"  # upper-case letters outside the 20 fold as X
    for bad, what in (("MKtay", "residue 3: lower-case 't'"), ("MKV*", "residue 4: '*'"),
                      ("MK1V", "residue 3: '1'")):
        with pytest.raises(Exception, match=what):
            check_sequence("r", bad)
    assert check_sequence("r", "MKtay*", "unk") == "MKtay*"  # fair-esm / transformers: each becomes X
    from esm_dual.common import residue_constants as rc

    assert [rc.restype_order_with_x.get(c, rc.unk_restype_index) for c in "Kt*"] == [11, 20, 20]


def test_unknown_residues_score(tmp_path, capsys, model, one_torch_thread):
    csv_path = tmp_path / "dms.csv"
    csv_path.write_text("mutant\nK2A\nT4A\n")
    seq = "MKaTY"
    args = ["score", "--model", model, "--sequence", seq, "--dms-input", csv_path, "--mutation-col", "mutant",
            "--dms-output", tmp_path / "o.csv", "--offset-idx", 1, "-q"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and "position 3" in err and "--unknown-residues unk" in err
    rc, _, err = run_cli(capsys, *args, "--unknown-residues", "unk")
    assert rc == 0, err
    with open(tmp_path / "o.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(np.isfinite(float(r[model])) for r in rows)


def test_pseudo_ppl_scores_each_distinct_sequence_once(tmp_path, capsys, model, monkeypatch, one_torch_thread):
    from esm_dual.cli import _common

    seq = "MKTAYIAKQRQ"
    csv_path = tmp_path / "dms.csv"
    # Synonymous rows are the wild type; A4G twice; the multi-mutant in two spellings.
    csv_path.write_text("mutant\nM1M\nK2K\nA4G\nA4G\nA4G:Y5F\nY5F:A4G\nT3T\n")
    rows_seen = []
    real = _common.TorchRunner.log_probs

    def counting(self, ids, mask, positions=None):
        rows_seen.append(ids.shape[0])
        return real(self, ids, mask, positions)

    monkeypatch.setattr(_common.TorchRunner, "log_probs", counting)
    monkeypatch.setenv("ESM_DUAL_PROGRESS_INTERVAL", "0")
    rc, _, err = run_cli(capsys, "score", "--model", model, "--sequence", seq, "--dms-input", csv_path,
                         "--dms-output", tmp_path / "o.csv", "--offset-idx", 1, "--scoring-strategy", "pseudo-ppl")
    assert rc == 0, err
    assert sum(rows_seen) == 3 * len(seq)  # wild type, A4G, A4G:Y5F: one masked copy per residue each
    assert "7 rows are 3 distinct sequences" in err
    assert "pseudo-ppl: 3/3 seq (100%)" in err and "\r" not in err
    with open(tmp_path / "o.csv") as f:
        vals = [float(r[model]) for r in csv.DictReader(f)]
    assert vals[0] == vals[1] == vals[6] and vals[2] == vals[3] and vals[4] == vals[5]
    assert len({vals[0], vals[2], vals[4]}) == 3


def test_progress_lines_in_logs(tmp_path, capsys, model, fasta, monkeypatch, one_torch_thread):
    monkeypatch.setenv("ESM_DUAL_PROGRESS_INTERVAL", "0")
    rc, _, err = run_cli(capsys, "embed", fasta, tmp_path / "p.h5", "-m", model, "--toks-per-batch", "30")
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("esm-dual: embed: ")]
    assert lines and lines[-1].startswith("esm-dual: embed: 3/3 seq (100%)")
    assert "\r" not in err
    rc, _, err = run_cli(capsys, "embed", fasta, tmp_path / "q.h5", "-m", model, "-q")
    assert rc == 0 and err == ""


@pytest.mark.slow
def test_quiet_silences_tensorflow(tmp_path, model):
    """`-q` with a TensorFlow command prints nothing at all, TensorFlow's C++ start-up lines included."""
    pytest.importorskip("tensorflow")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    p = subprocess.run([sys.executable, "-m", "esm_dual.cli.main", "convert", model, str(tmp_path / "m.keras"),
                        "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "" and p.stdout == ""
    assert os.path.isfile(tmp_path / "m.keras")


def test_tensorflow_files_name_the_convert_command(tmp_path, capsys, model, fasta):
    """info, embed and from_pretrained do not read .keras / tf_model.h5 themselves: they say which command
    turns them into a directory they read."""
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"PK")
    tf_dir = tmp_path / "tfh5"
    tf_dir.mkdir()
    (tf_dir / "config.json").write_text(open(os.path.join(model, "config.json")).read())
    (tf_dir / "tf_model.h5").write_bytes(b"")
    for path, stem in ((keras_file, "m"), (tf_dir, "tfh5")):
        want = f"esm-dual convert {path} {stem}_hf --to hf"
        rc, _, err = run_cli(capsys, "info", path)
        assert rc == 2 and want in err, err
        rc, _, err = run_cli(capsys, "embed", fasta, tmp_path / "o.h5", "--model", path, "-q")
        assert rc == 2 and want in err, err
        from esm_dual.pt import EsmModel

        with pytest.raises(Exception, match=want.replace(".", r"\.")):
            EsmModel.from_pretrained(str(path))
