"""Every command and Python snippet in README.md and docs/*.md runs as written, offline and on small
settings, or its first line says what it needs (`# needs: CIFAR-10`, `# needs: network`, `# needs: a CUDA
GPU`, ...) and it is only shown."""
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import zygote as zygote_server
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
RUN = {"python", "bash"}                                        # fenced languages that are executed
SHOWN = {"yaml", "text", "json", "console", "csv", "ini", "toml", ""}   # shown only (no commands)
# what a snippet's folder holds: the scripts, modules and configs a user runs from a checkout
CHECKOUT = ("train.py", "evaluate.py", "benchmark.py", "vqvae.py", "vqvae_experiment.py", "vqvae_grid.py",
            "config.yaml", "config_mac.yaml", "configs", "tools", "analyze.ipynb", "gpu_check.sh")


def code_blocks(path: Path) -> list:
    """(language, code, line number) of every fenced block of a Markdown file, in order."""
    text = path.read_text()
    return [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1) for m in BLOCK.finditer(text)]


def needs(code: str) -> str | None:
    """What a block says it needs (its first line `# needs: ...`), or None: then it is run."""
    first = code.lstrip("\n").split("\n", 1)[0].strip()
    return first[len("# needs:"):].strip() if first.startswith("# needs:") else None


def test_the_docs_exist_and_every_block_is_run_or_says_what_it_needs():
    assert (ROOT / "README.md").is_file() and len(DOCS) > 1
    problems = []
    for doc in DOCS:
        for lang, code, line in code_blocks(doc):
            where = f"{doc.name}:{line}"
            if lang not in RUN | SHOWN:
                problems.append(f"{where}: fenced as '{lang}' (use python or bash to run it, or text/yaml to show it)")
            elif lang in SHOWN and re.search(r"^\s*(python|pip|bash|torchrun)\b", code, re.M):
                problems.append(f"{where}: a command in a '{lang or 'plain'}' block (use a bash block)")
            elif lang in RUN and needs(code) == "":
                problems.append(f"{where}: '# needs:' says nothing")
    assert problems == []


def test_the_block_reader_sees_runnable_and_marked_blocks(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("a\n```bash\necho hi\n```\n\n```python\n# needs: network\nimport os\n```\n```yaml\nk: 1\n```\n")
    blocks = code_blocks(md)
    assert [(lang, needs(code), line) for lang, code, line in blocks] == [
        ("bash", None, 2), ("python", "network", 6), ("yaml", None, 10)]


@pytest.fixture(scope="module")
def zygote():
    """A preloaded interpreter that runs the snippets' `python FILE.py ...` commands (tests/zygote.py): the
    path of its socket, or None where it cannot start (then the snippets use new interpreters)."""
    folder = tempfile.mkdtemp(prefix="bavq-zygote-")           # short: a socket path has at most 107 bytes
    path = os.path.join(folder, "s")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py"), path], cwd=folder, env=env)
    deadline = time.time() + 120
    while not os.path.exists(path) and server.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    yield path if os.path.exists(path) else None
    if server.poll() is None:
        zygote_server.stop(path)
        server.wait(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def _checkout_copy(tmp_path: Path, zygote: str | None = None) -> tuple[Path, dict]:
    """A folder with the checkout's scripts and configs (symlinked), and an environment in which
    `python` is this interpreter (`python FILE.py ...` through the preloaded one when ``zygote`` is its
    socket) and W&B is off."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in CHECKOUT:
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    run = (f'"{sys.executable}" -S "{ROOT / "tests" / "zygote.py"}" --client "{sys.executable}" "{zygote}"'
           if zygote else f'"{sys.executable}"')
    for exe in ("python", "python3"):                # a shim, not a link: a link would lose the virtualenv
        (bin_dir / exe).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (bin_dir / exe).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return work, env


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_snippet_runs(doc, tmp_path, monkeypatch, zygote):
    """The file's python blocks run in order in one namespace (as in a notebook), its bash blocks each as
    one `bash -e` script, all in one folder; blocks that say what they need are skipped."""
    work, env = _checkout_copy(tmp_path, zygote)
    monkeypatch.chdir(work)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    namespace = {"__name__": "__snippet__"}
    ran = 0
    for lang, code, line in code_blocks(doc):
        if lang not in RUN or needs(code) is not None:
            continue
        if lang == "python":
            try:
                exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)
            except Exception as e:           # noqa: BLE001 - the report names the block
                pytest.fail(f"{doc.name}, python block at line {line}: {type(e).__name__}: {e}")
        else:
            r = subprocess.run(["bash", "-e", "-c", code], cwd=work, env=env, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"{doc.name}, bash block at line {line}:\n{code}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        ran += 1
    if ran == 0:
        pytest.skip(f"{doc.name} has no runnable block")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@functools.cache
def anchors(path: Path) -> set:
    """The anchors GitHub gives the headings of a Markdown file (outside fenced blocks): lower case, punctuation
    but hyphens and underscores dropped, spaces to hyphens, a repeated heading with -1, -2, ..."""
    seen, out = {}, set()
    for line in BLOCK.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()))
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_its_heading(doc):
    broken = []
    for target in LINK.findall(BLOCK.sub("", doc.read_text())):
        if re.match(r"^[a-z]+:", target):                          # http:, https:, mailto: are not checked here
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor in {path.name}")
    assert not broken, f"{doc.name} has broken links:\n" + "\n".join(broken)
