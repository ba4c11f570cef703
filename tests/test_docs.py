"""Every command and Python snippet in README.md and docs/*.md runs as written, offline and on small
settings, or its first line says what it needs (`# needs: CIFAR-10`, `# needs: network`, `# needs: a CUDA
GPU`, ...) and it is only shown. A command written inline in the prose is shown in such a block too, or is
allowed with its reason (test_every_inline_command_is_in_a_fenced_block_or_allowed)."""
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
CHECKOUT = ("train.py", "evaluate.py", "benchmark.py", "vqvae.py", "vqvae_fused.py", "vqvae_experiment.py", "vqvae_grid.py",
            "vqvae_analysis.py",
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


# Inline commands in prose: the rule is test_every_inline_command_is_in_a_fenced_block_or_allowed's docstring.
PROGRAMS = {"python", "python3", "torchrun", "bash", "sh", "pip", "pip3", "pytest", "jupyter", "sbatch", "srun",
            "wandb", "git", "tar", "make", "docker"}
INLINE_ALLOWED = {   # command: why it is only mentioned, not in a block
    "wandb sync": "W&B's own tool: uploads an offline run, needs the network and a W&B account",
    "pip install jupyterlab": "needs the network (the package registry)",
    "BAVQ_EXPERIMENTS_DIR=runs/grid1 jupyter lab analyze.ipynb": "interactive: needs jupyterlab and a browser",
}
SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
ENV = re.compile(r"""^[A-Za-z_][A-Za-z0-9_]*=("[^"]*"|'[^']*'|\S*)(\s+|$)""")


def normalised(text: str) -> str:
    """One line: backslash continuations joined, whitespace runs as one space."""
    return " ".join(re.sub(r"\\\n", " ", text).split())


def is_command(span: str) -> bool:
    """Whether an inline code span is a command a user would copy into a shell (the rule above)."""
    rest, assigned = normalised(span), False
    while m := ENV.match(rest):
        rest, assigned = rest[m.end():], True
    words = rest.split()
    if words and words[-1] in ("...", "…"):                       # `python train.py ...`: more arguments
        words = words[:-1]
    if not words:
        return False
    if assigned or words[0].startswith("./"):
        return True
    if words[0] in PROGRAMS:
        return len(words) > 1
    path = ROOT / words[0]
    return path.is_file() and os.access(path, os.X_OK)


def inline_commands(path: Path) -> list:
    """(command, line number) of every inline code span outside the fenced blocks that is a command."""
    text = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())   # blocks out, lines kept
    return [(normalised(m.group(2)), text[:m.start()].count("\n") + 1) for m in SPAN.finditer(text)
            if is_command(m.group(2))]


def block_command_lines(docs=DOCS) -> list:
    """The words of every command line of every bash block of the docs: continuations joined, comments dropped."""
    lines = []
    for doc in docs:
        for lang, code, _ in code_blocks(doc):
            if lang == "bash":
                for line in re.sub(r"\\\n", " ", code).splitlines():
                    words = re.sub(r"(^|\s)#.*$", "", line).split()
                    if words:
                        lines.append(words)
    return lines


def in_a_block(command: str, lines: list) -> bool:
    """Whether the command's words are a run of whole words of one block line (a trailing `...` matches more)."""
    words = command.split()
    if words and words[-1] in ("...", "…"):
        words = words[:-1]
    n = len(words)
    return any(line[i:i + n] == words for line in lines for i in range(len(line) - n + 1))


def test_the_inline_command_reader_tells_commands_from_words(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("Run `python train.py --epochs 2 \\\n    --quantizer vq` or `bash gpu_check.sh DIR`; set\n"
                  "`--epochs 2`, `python`, `WANDB_MODE=disabled`, `PARTS=\"a b\"`, `tools/frontier_table.py`;\n"
                  "`OUT=/tmp/x bash gpu_check.sh` and `tools/targets.sh` and `.ci/run` and ``./x.sh y``.\n"
                  "```bash\npython not_inline.py --x\n```\n")
    assert inline_commands(md) == [("python train.py --epochs 2 --quantizer vq", 1), ("bash gpu_check.sh DIR", 2),
                                   ("OUT=/tmp/x bash gpu_check.sh", 4), ("tools/targets.sh", 4), (".ci/run", 4),
                                   ("./x.sh y", 4)]
    block = tmp_path / "b.md"
    block.write_text("```bash\n# needs: a GPU\npython train.py --a 1 \\\n    --b 2   # note\nbash x.sh DIR\n```\n")
    lines = block_command_lines([block])
    assert lines == [["python", "train.py", "--a", "1", "--b", "2"], ["bash", "x.sh", "DIR"]]
    assert in_a_block("python train.py --a 1", lines) and in_a_block("--a 1 --b 2", lines)
    assert in_a_block("python train.py --a 1 ...", lines) and in_a_block("x.sh", lines)
    assert not in_a_block("python train.py --a 12", lines) and not in_a_block("--b 2 bash", lines)


def test_every_inline_command_is_in_a_fenced_block_or_allowed():
    """Every command written inline in README.md or docs/*.md is shown in a fenced bash block, which is run
    (test_every_snippet_runs) or says what it needs, or is one of the few INLINE_ALLOWED, each with its reason.

    An inline code span (outside fenced blocks; whitespace-normalised: a backslash line continuation joined,
    every run of whitespace one space, a trailing `...` read as "more arguments") is a command when it is
      * NAME=value assignments followed by anything (`OUT=/tmp/x bash gpu_check.sh DIR`); assignments alone
        (`WANDB_MODE=disabled`) are a setting, not a command;
      * a program of PROGRAMS followed by at least one argument (`python train.py --epochs 2`, `pip install -e .`);
        a program's name alone (`python`, `torchrun`) is a word;
      * anything starting with `./`, or a path to an executable file of the checkout, with or without
        arguments (`.ci/run`, `tools/targets.sh`, `gpu_check.sh`).
    A flag alone (`--epochs 2`), a file that is not executable (`tools/frontier_table.py`) or a Python
    expression is not a command. A command is shown in a block when its words are a run of whole words of one
    command line of a bash block (continuations joined, comments dropped) of any of the docs. Entries of
    INLINE_ALLOWED that no doc uses any more are reported too."""
    lines, seen, problems = block_command_lines(), set(), []
    for doc in DOCS:
        for command, line in inline_commands(doc):
            seen.add(command)
            if command not in INLINE_ALLOWED and not in_a_block(command, lines):
                problems.append(f"{doc.name}:{line}: `{command}` is in no fenced bash block (put it in one, run or "
                                f"marked '# needs: ...', say it in words, or allow it in INLINE_ALLOWED with a reason)")
    problems += [f"INLINE_ALLOWED['{c}'] occurs in no doc: remove it" for c in INLINE_ALLOWED if c not in seen]
    assert problems == [], "\n".join(problems)


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
