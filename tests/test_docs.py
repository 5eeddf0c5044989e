"""The documentation's Python examples run as written.

Every ```python block in README.md and docs/*.md is executed on its own, in a fresh namespace and
a temporary working directory, with compiledopt's data and cache folders and the Hugging Face
cache pointed inside it and the Hub offline. An HTML comment on the line right before a fence
may say what a block needs or why it cannot run here:

    <!-- requires: transformers, accelerate -->   skipped only when one of them is not installed
    <!-- doc-test: skip (the reason) -->           never run here; the reason is reported

Other blocks (bash, text) are left alone. A test also holds the documented order of
``backend="auto"`` to the code's.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(requires|doc-test)\s*:\s*(.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip\s*\((.+)\)$")


@dataclass(frozen=True)
class Block:
    """One ```python block of a Markdown file."""

    file: str  # relative to the repository root
    index: int  # the block's number among the file's python blocks, from 1
    line: int  # the line of its first code line (1-based)
    heading: str  # the nearest heading above it
    code: str
    requires: Tuple[str, ...] = ()
    skip: Optional[str] = None  # the reason it is not run

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{self.file}:{self.index:02d}-{slug or 'top'}"


def python_blocks(path: Path) -> List[Block]:
    """The ```python blocks of the Markdown file ``path``, with their markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    heading, fence, start, language = "", None, 0, ""
    for number, text in enumerate(lines, start=1):
        match = _FENCE.match(text)
        if fence is None:
            if text.startswith("#"):
                heading = text.lstrip("#").strip()
            if match:
                fence, start, language = match.group(1), number, match.group(2)
            continue
        if not (match and match.group(2) == "" and match.group(1) == fence):
            continue
        if language == "python":
            body = [line[len(fence) :] for line in lines[start : number - 1]]
            requires, skip = _markers(lines[start - 2] if start >= 2 else "", path, start)
            blocks.append(
                Block(
                    file=path.relative_to(ROOT).as_posix(),
                    index=len(blocks) + 1,
                    line=start + 1,
                    heading=heading,
                    code="\n".join(body) + "\n",
                    requires=requires,
                    skip=skip,
                )
            )
        fence = None
    assert fence is None, f"{path}:{start}: a code fence is never closed"
    return blocks


def _markers(text: str, path: Path, line: int) -> Tuple[Tuple[str, ...], Optional[str]]:
    match = _MARKER.match(text)
    if not match:
        return (), None
    kind, value = match.groups()
    if kind == "requires":
        names = tuple(name.strip() for name in value.split(",") if name.strip())
        assert names, f"{path}:{line - 1}: 'requires:' names no module"
        return names, None
    skip = _SKIP.match(value)
    assert skip, f"{path}:{line - 1}: write 'doc-test: skip (the reason)', not {value!r}"
    return (), skip.group(1).strip()


BLOCKS = [block for path in DOCS for block in python_blocks(path)]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A temporary working directory; compiledopt's and the Hub's folders inside it, offline."""
    monkeypatch.chdir(tmp_path)
    for variable, folder in [
        ("COMPILEDOPT_HOME", "data"),
        ("COMPILEDOPT_CACHE", "cache"),
        ("HF_HOME", "hf"),
        ("HF_HUB_CACHE", "hf/hub"),
    ]:
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    yield tmp_path
    torch.random.set_rng_state(state)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_example_runs(block: Block, sandbox) -> None:
    if block.skip:
        pytest.skip(f"{block.file}:{block.line}: {block.skip}")
    for module in block.requires:
        if module == "cuda":
            if not torch.cuda.is_available():
                pytest.skip(f"{block.file}:{block.line} needs a CUDA device")
        else:
            pytest.importorskip(module, reason=f"{block.file}:{block.line} needs {module}")
    # Blank lines in front so that a traceback names the Markdown file's own line numbers.
    source = "\n" * (block.line - 1) + block.code
    code = compile(source, str(ROOT / block.file), "exec")
    exec(code, {"__name__": "__main__"})


def test_every_document_is_read() -> None:
    names = {block.file for block in BLOCKS}
    assert {"README.md", "docs/integrations.md", "docs/security.md"} <= names
    assert len({block.id for block in BLOCKS}) == len(BLOCKS)


def test_the_reader_finds_blocks_and_markers(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n```bash\necho no\n```\n\n## Use\n\n<!-- requires: transformers, lightning -->\n"
        "```python\nx = 1\n```\n\n<!-- doc-test: skip (needs two GPUs) -->\n```python\ny = 2\n"
        "```\n\n- a list\n\n  ```python\n  z = 3\n  ```\n"
    )
    first, second, third = python_blocks(page)
    assert (first.requires, first.skip, first.code, first.line) == (
        ("transformers", "lightning"),
        None,
        "x = 1\n",
        11,
    )
    assert second.skip == "needs two GPUs" and not second.requires
    assert third.code == "z = 3\n" and third.id == "page.md:03-use"


def _documented_order(path: Path, lead: str) -> List[str]:
    text = " ".join(path.read_text(encoding="utf-8").split())
    match = re.search(re.escape(lead) + r" `([a-z, ]+)`", text)
    assert match, f"{path.name} no longer says {lead!r} followed by the order"
    return [name.strip() for name in match.group(1).split(",")]


def test_the_documented_auto_order_is_the_codes(sandbox) -> None:
    from compiledopt.pretrained import load
    from compiledopt.runtime.autotune import DEFAULT_ORDER
    from compiledopt.runtime.choice import auto_order

    # Nothing recorded (COMPILEDOPT_CACHE is empty): auto's default order.
    order = list(auto_order(load("normalized-mlp"), torch.device("cpu")))
    assert order == list(DEFAULT_ORDER)
    docs = ROOT / "docs"
    assert _documented_order(docs / "security.md", "with nothing measured, in the order") == order
    runtime = _documented_order(docs / "runtime.md", "Without a recording, the order is")
    assert [*runtime, "eager"] == order  # runtime.md: "eager always runs and comes last"
