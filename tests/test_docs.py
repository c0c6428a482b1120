"""README.md and docs/*.md cite only files that are in the repository, and their commands run as written.

- every relative link or image (``[text](path)``) and every path written from the repository root
  (``src/...``, ``docs/...``, ``tests/...``, ``benchmarks/...``, ``scripts/...``, ``.ci/...``) exists and
  is tracked by git (a folder: some tracked file is under it); http(s) links are not fetched;
- the only paths outside the repository are the data-folder arguments ``../shared/data/<set>`` of the
  commands (the README says what they stand for);
- commands run in a fresh shell after the README's setup: the console scripts and ``python`` are called
  as ``.venv/bin/...``, or the document says once to activate the venv;
- no documented command writes its output (``--json``, ``--csv``, ``--out``, ``--screenshot``) over a
  tracked file or into a folder that holds tracked files.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ROOTS = ("src", "docs", "tests", "benchmarks", "scripts", ".ci")
DATA_ARG = re.compile(r"\.\./shared/data(/(dsb2018|kvasir_seg|ct_segthor_aorta))?/?$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(map(re.escape, ROOTS)) + r")/[\w./-]*)")
OUTSIDE = re.compile(r"(?<![\w./~-])(\.\./[\w./-]+)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
OUTPUT_FLAGS = {"--json", "--csv", "--out", "--screenshot"}
COMMANDS = re.compile(r"^(segthenseg-\w+|python3?|napari|torchrun|pytest|ruff)$")
ACTIVATE = "source .venv/bin/activate"
# Cited in docs/RESULTS.md but never committed (the old `runs/` ignore rule also matched docs/runs/):
# listed here so that the suite stays green; remove an entry when its files are added.
KNOWN_MISSING: set[str] = set()


@cache
def tracked() -> frozenset[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    return frozenset(out.stdout.split("\0")) - {""}


def is_tracked(rel: str) -> bool:
    rel = rel.rstrip("/")
    return rel in tracked() or any(f.startswith(rel + "/") for f in tracked())


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def commands(text: str) -> list[list[str]]:
    """Shell commands in fenced blocks (continuation lines joined) and in inline code."""
    lines = []
    for block in FENCE.findall(text):
        lines += [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip()
                  and not ln.lstrip().startswith("#")]
    lines += [code for code in INLINE.findall(text) if " " in code.strip()]  # a bare name is no command
    out = []
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        # a line may chain commands: `bash scripts/setup.sh && .venv/bin/segthenseg-demo`
        cmd: list[str] = []
        for w in words:
            if w in ("&&", "||", ";", "|"):
                out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
        out.append(cmd)
    return [c for c in out if c]


def strip_env(cmd: list[str]) -> list[str]:
    """Drop ``VAR=value`` prefixes and wrappers (xvfb-run and its options) to reach the program."""
    i = 0
    while i < len(cmd) and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[i]):
        i += 1
    if i < len(cmd) and cmd[i] == "xvfb-run":
        i += 1
        while i < len(cmd) and cmd[i].startswith("-"):
            i += 2 if cmd[i] == "-s" else 1
    return cmd[i:]


def output_targets(cmd: list[str]) -> list[str]:
    return [cmd[i + 1] for i, w in enumerate(cmd[:-1]) if w in OUTPUT_FLAGS]


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_links_and_paths_exist_and_are_tracked(doc: Path):
    text = doc.read_text()
    outputs = {t for c in commands(text) for t in output_targets(strip_env(c))}
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # http(s), mailto: not fetched; anchors in the same page
        rel = (doc.parent / target.split("#")[0]).resolve()
        try:
            rel_s = str(rel.relative_to(REPO))
        except ValueError:
            missing.append(f"link {target} (outside the repository)")
            continue
        if not is_tracked(rel_s):
            missing.append(f"link {target}")
    for path in REPO_PATH.findall(text):
        path = path.rstrip(".")
        if path in outputs or path in KNOWN_MISSING or any(ch in path for ch in "*<>"):
            continue
        if not is_tracked(path):
            missing.append(f"path {path}")
    for path in OUTSIDE.findall(text):
        if not DATA_ARG.match(path.rstrip(".")):
            missing.append(f"path {path} (outside the repository: not citable)")
    assert not missing, f"{doc_id(doc)} cites what is not tracked in git: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_commands_run_from_a_fresh_shell(doc: Path):
    text = doc.read_text()
    if ACTIVATE in text:
        return  # the document says once to activate the venv
    bare = sorted({strip_env(c)[0] for c in commands(text) if strip_env(c)
                   and COMMANDS.match(strip_env(c)[0])})
    assert not bare, (f"{doc_id(doc)}: {bare} would not be found in a fresh shell: write .venv/bin/... "
                      f"or say `{ACTIVATE}` once")


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_documented_commands_do_not_overwrite_tracked_files(doc: Path):
    bad = sorted({t for c in commands(doc.read_text()) for t in output_targets(strip_env(c))
                  if not t.startswith(("/", "~", "$")) and is_tracked(t.replace("./", "", 1))})
    assert not bad, f"{doc_id(doc)}: documented commands write over tracked files: {bad}"


def test_known_missing_files_are_still_missing():
    """When the files arrive, drop them from KNOWN_MISSING so that the check covers them again."""
    assert not [p for p in KNOWN_MISSING if is_tracked(p)]


def test_the_checks_see_what_they_should():
    text = ("See [the card](docs/MODEL_CARD.md), `src/trainer/evaluate.py` and ../shared/data/dsb2018.\n"
            "```bash\nOMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_inference.py --data D \\\n"
            "    --json out/x.json && segthenseg-eval default D\n```\n")
    cmds = [strip_env(c) for c in commands(text)]
    assert [c[0] for c in cmds][:2] == [".venv/bin/python", "segthenseg-eval"]
    assert output_targets(cmds[0]) == ["out/x.json"]
    assert LINK.findall(text) == ["docs/MODEL_CARD.md"]
    assert REPO_PATH.findall(text)[:2] == ["docs/MODEL_CARD.md", "src/trainer/evaluate.py"]
    assert [p for p in OUTSIDE.findall(text) if DATA_ARG.match(p.rstrip("."))] == ["../shared/data/dsb2018."]
    assert is_tracked("README.md") and is_tracked("docs") and not is_tracked("runs/x")
