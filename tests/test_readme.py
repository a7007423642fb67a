"""The README works as written: every python and console/bash block runs on a CPU install, offline, from the
repository alone (its data in tests/data, no ../shared), and it names every command.

Blocks run in one scratch directory, in README order, with ``tests/data`` linked into it, ``esm-dual`` as this
checkout's CLI, ``HF_HUB_OFFLINE=1`` and a Hugging Face cache that holds RANDOM tiny checkpoints under the hub
ids the README names (``facebook/esm2_t6_8M_UR50D``, ``facebook/esmfold_v1``): code that says
``from_pretrained("esm2_t6_8M_UR50D")`` runs unchanged and gets weights of the right kind (their values and
sizes do not matter to whether the code runs). In console blocks the ``$`` lines are run; in bash blocks every
line, minus ``pip install`` steps (the test environment is the installed one). A block preceded by
``<!-- readme-test: skip REASON -->`` is skipped; REASON must say it needs a GPU or the network.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.utils import ROOT

README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(.*?)\s*-->")
HUB_IDS = {"esm2_t6_8M_UR50D": "facebook/esm2_t6_8M_UR50D", "esmfold_v1": "facebook/esmfold_v1"}


def readme_blocks(path: str = README) -> list[tuple[int, str, str, str | None]]:
    """(line number, language, text, skip reason) of every fenced block."""
    lines = open(path, encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            start, lang, body = i + 1, m.group(1), []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            prev = next((ln for ln in reversed(lines[: start - 1]) if ln.strip()), "")
            skip = SKIP.search(prev)
            blocks.append((start, lang, "\n".join(body) + "\n", skip.group(1) if skip else None))
        i += 1
    return blocks


def console_commands(text: str, lang: str) -> list[str]:
    """The commands of a console block (``$`` lines with their ``\\`` continuations) or of a bash block."""
    cmds, cur = [], None
    for line in text.splitlines():
        if lang == "console":
            if cur is None:
                if not line.startswith("$ "):
                    continue  # output
                cur = line[2:]
            else:
                cur += "\n" + line
        else:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cur = line if cur is None else cur + "\n" + line
        if cur.endswith("\\"):
            continue
        cmds.append(cur)
        cur = None
    return cmds


def without_pip(cmd: str) -> str | None:
    """``pip install ... && a && b`` -> ``a && b`` (None when nothing is left). The test command (``python -m
    pytest``) is left out too: it is what runs this test."""
    parts = [p.strip() for p in cmd.split("&&")]
    rest = [p for p in parts if not re.match(r"^(python -m )?(pip install|pytest)\b", p)]
    return " && ".join(rest) or None


def readme_run_command() -> str:
    """The README's install+run command without its pip step (what .ci/run runs in a fresh copy)."""
    text = open(README, encoding="utf-8").read()
    section = text.split("## Install and run", 1)[1]
    lines, i = section.splitlines(), 0
    while not lines[i].startswith("```bash"):
        i += 1
    cmd = without_pip(lines[i + 1])
    assert cmd, "the README's run command is only a pip install"
    return cmd


def test_readme_run_command_runs_offline_on_repository_data():
    cmd = readme_run_command()
    assert "esm-dual init" in cmd and "--random" in cmd and "tests/data/" in cmd


def test_readme_blocks_parse_and_skips_are_justified():
    blocks = readme_blocks()
    langs = {lang for _, lang, _, _ in blocks}
    assert {"python", "console", "bash"} <= langs
    for line, lang, _, skip in blocks:
        assert lang in ("python", "console", "bash", "text"), f"README line {line}: unknown block language {lang!r}"
        if skip is not None:
            assert re.search(r"\b(GPU|CUDA|network|hub access)\b", skip), f"README line {line}: skip reason {skip!r}"


def test_readme_names_every_command_and_no_shared_data():
    from esm_dual.cli.main import COMMANDS

    text = open(README, encoding="utf-8").read()
    intro = text.split("## Install", 1)[0]
    for name in COMMANDS:
        assert f"`{name}`" in intro, f"the README's command list lacks {name}"
    offenders = []
    for top in ("README.md", "tests", "benchmarks", "conversion", "docs", ".ci", "esm_dual", "pyproject.toml"):
        base = os.path.join(ROOT, top)
        files = [base] if os.path.isfile(base) else [os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs]
        for f in files:
            if f.endswith((".py", ".md", ".toml", ".txt", ".cfg")) or os.path.basename(f) == "run":
                body = open(f, encoding="utf-8", errors="replace").read()
                if re.search(r"\.\./shared|shared/data|ESM_DUAL_SHARED_DATA", body) and f != __file__:
                    offenders.append(os.path.relpath(f, ROOT))
    assert not offenders, f"files that read data from outside the repository: {offenders}"


def _fake_hub_cache(cache: str) -> None:
    """RANDOM tiny checkpoints in the Hugging Face cache layout under the hub ids the README names."""
    from esm_dual.cli.init import write_random_checkpoint

    for preset, hub_id in HUB_IDS.items():
        repo = os.path.join(cache, "models--" + hub_id.replace("/", "--"))
        rev = "0" * 40
        write_random_checkpoint(preset, os.path.join(repo, "snapshots", rev), tiny=True, seed=0)
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(rev)


@pytest.mark.slow
def test_readme_blocks_run(tmp_path):
    pytest.importorskip("torch")
    work = tmp_path / "work"
    (work / "tests").mkdir(parents=True)
    os.symlink(os.path.join(ROOT, "tests", "data"), work / "tests" / "data")
    cache = str(tmp_path / "hf_cache")
    _fake_hub_cache(cache)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache, HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg")
    shim = f"esm-dual() {{ {shlex.quote(sys.executable)} -m esm_dual.cli.main \"$@\"; }}\nset -e\n"
    ran = 0
    for line, lang, text, skip in readme_blocks():
        if skip is not None or lang == "text":
            continue
        if lang == "python":
            p = subprocess.run([sys.executable, "-c", text], cwd=work, env=env, capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, f"README python block at line {line} failed:\n{text}\n{p.stderr[-4000:]}"
            ran += 1
            continue
        for cmd in console_commands(text, lang):
            cmd = without_pip(cmd)
            if cmd is None:
                continue
            p = subprocess.run(["bash", "-c", shim + cmd], cwd=work, env=env, capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, f"README command at line {line} failed:\n{cmd}\n{p.stderr[-4000:]}"
            ran += 1
    assert ran >= 10
