"""The documentation runs as written: every ```python block of README.md, CONTRIBUTING.md,
benchmarks/README.md and docs/*.md is executed, and every repository path they name exists.

The blocks of one page run in order in one namespace (a page reads as one session: a later block may use
the model a former one built), in a temporary working directory, on the CPU. A block that is not meant to
run (it needs torchrun, a GPU or a dataset) is preceded by the line ``<!-- no-run: <why> -->``; each such
block is reported as a skip carrying its reason (``pytest -ra`` lists them), and the count is kept small by
``MAX_NO_RUN``. Links between docs pages (and their anchors) are checked by ``mkdocs build --strict`` in CI;
here the links of the pages outside the site and every path written in any page are checked.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
PAGES = sorted(["README.md", "CONTRIBUTING.md", os.path.join("benchmarks", "README.md")]
               + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")])
NO_RUN = re.compile(r"<!--\s*no-run:\s*(.*?)\s*-->")
MAX_NO_RUN = 6       # blocks that cannot run in a unit test (torchrun, fragments of a larger program)
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    page: str
    line: int          # 1-based line of the opening fence
    lang: str
    code: str
    no_run: str | None  # the reason, for a block marked <!-- no-run: ... -->


def blocks(page: str) -> list[Block]:
    lines = open(os.path.join(ROOT, page), encoding="utf-8").read().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        mark = NO_RUN.search(prev)
        out.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:j]), mark.group(1) if mark else None))
        i = j + 1
    return out


ALL = [b for p in PAGES for b in blocks(p)]
PYTHON = [b for b in ALL if b.lang == "python"]
RUNNABLE_PAGES = sorted({b.page for b in PYTHON if b.no_run is None})
NOT_RUN = [b for b in PYTHON if b.no_run is not None]


def test_pages_found():
    assert "README.md" in PAGES and len(PAGES) >= 10, PAGES
    assert len(PYTHON) >= 10, "no python blocks found: the extraction is broken"


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs:{page}"}
    for b in (b for b in PYTHON if b.page == page and b.no_run is None):
        code = compile(b.code, f"{page}:{b.line}", "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(code, namespace)
            except Exception as e:
                raise AssertionError(f"the python block at {page}:{b.line} fails as written: "
                                     f"{type(e).__name__}: {e}") from e


@pytest.mark.parametrize("block", NOT_RUN, ids=[f"{b.page}:{b.line}" for b in NOT_RUN])
def test_blocks_not_run_are_reported(block):
    assert block.no_run, f"{block.page}:{block.line}: <!-- no-run: --> needs a reason"
    compile(block.code, f"{block.page}:{block.line}", "exec")     # still valid Python
    pytest.skip(f"not run ({block.page}:{block.line}): {block.no_run}")


def test_no_run_blocks_stay_rare():
    assert len(NOT_RUN) <= MAX_NO_RUN, [f"{b.page}:{b.line} ({b.no_run})" for b in NOT_RUN]


def test_every_fence_has_a_language():
    bare = [f"{b.page}:{b.line}" for b in ALL if not b.lang]
    assert not bare, f"code blocks without a language (```python, ```bash, ```text): {bare}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w/.-])((?:benchmarks|docs|examples|scripts|tests|gradreg_fast|csrc)/[\w./-]*\w)")


def _written_paths(text: str) -> set[str]:
    found = set()
    for m in PATH.finditer(text):
        path = m.group(1)
        if text[m.end():m.end() + 2].lstrip(".")[:1] in ("{", "<", "*"):   # a pattern: bench_step_<device>.{txt,json}
            continue
        found.add(path)
    return found


@pytest.mark.parametrize("page", PAGES)
def test_named_paths_exist(page):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    here = os.path.dirname(os.path.join(ROOT, page))
    missing = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        if not os.path.exists(os.path.join(here, target.split("#")[0])):
            missing.append(f"link {target}")
    for path in _written_paths(text):
        if not os.path.exists(os.path.join(ROOT, path)):
            missing.append(path)
    assert not missing, f"{page} names paths that do not exist: {sorted(missing)}"
