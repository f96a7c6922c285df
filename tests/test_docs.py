"""Every ```python block in README.md and docs/**/*.md (devdocs included) runs (```python no-run is skipped).

Blocks of one file run in order in one namespace, like a reader pasting them into one session.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.exists()]


def _blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if "no-run" in m.group(1):
            continue
        line = text[: m.start()].count("\n") + 2
        out.append((line, m.group(2)))
    return out


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_code_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    if any("diffusers" in code for _, code in blocks) and importlib.util.find_spec("diffusers") is None:
        pytest.skip(f"{path.name} needs the diffusers extra")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in blocks:
        try:
            exec(compile(code, f"{path.name}:{line}", "exec", dont_inherit=True), namespace)
        except Exception as exc:  # report which block failed
            raise AssertionError(f"{path.relative_to(ROOT)} block at line {line} failed: {exc!r}") from exc


def test_docs_have_code() -> None:
    """The docs test must not pass vacuously: README has runnable examples."""
    assert _blocks(ROOT / "README.md"), "README.md has no runnable python block"
