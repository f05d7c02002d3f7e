"""BENCHMARKS.md's generated tables agree with the files under bench/ (tools/bench_tables.py), every
marked block has a renderer, no machine paths, and the links into BENCHMARKS.md and docs/GUIDE.md
land on headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import bench_tables
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "BENCHMARKS.md"
GUIDE = ROOT / "docs" / "GUIDE.md"
README = ROOT / "README.md"


def test_every_generated_table_agrees_with_bench():
    changes = bench_tables.diff(DOC, bench_tables.BENCH)
    assert changes == "", f"run `python tools/bench_tables.py` (or fix the data's renderer):\n{changes}"


def test_every_marked_block_has_a_renderer():
    names = bench_tables.marked(DOC.read_text(encoding="utf-8"))
    assert len(names) >= 20, names
    missing = sorted(set(names) - set(bench_tables.RENDERERS))
    assert missing == [], f"marked in BENCHMARKS.md without a renderer: {missing}"
    unused = sorted(set(bench_tables.RENDERERS) - set(names))
    assert unused == [], f"renderers whose table is not in BENCHMARKS.md: {unused}"


def test_the_check_sees_a_changed_table_and_a_block_without_renderer(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    start = bench_tables.START.format("sweep")
    at = text.index(start) + len(start)
    row = text.index("| 0% |", at)
    changed = tmp_path / "BENCHMARKS.md"
    changed.write_text(text[:row] + "| 0% | 1.00 |" + text[row + len("| 0% | 29.60 |"):], encoding="utf-8")
    assert "-| 0% | 1.00 |" in bench_tables.diff(changed, bench_tables.BENCH)
    assert bench_tables.main(["--check", "--doc", str(changed)]) == 1
    unknown = tmp_path / "unknown.md"
    unknown.write_text(f"{bench_tables.START.format('nothing')}\n{bench_tables.END.format('nothing')}\n")
    with pytest.raises(KeyError, match="nothing"):
        bench_tables.render(unknown.read_text())
    unclosed = f"{bench_tables.START.format('sweep')}\n| a |\n"
    with pytest.raises(ValueError, match="sweep"):
        bench_tables.marked(unclosed)


@pytest.mark.parametrize("path", [DOC, GUIDE], ids=["BENCHMARKS.md", "docs/GUIDE.md"])
def test_no_machine_paths(path):
    found = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             for p in bench_tables.MACHINE_PATHS if p in line]
    assert found == [], f"machine paths in {path.name}: {found}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text(encoding="utf-8"))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("source", [README, DOC, GUIDE], ids=["README.md", "BENCHMARKS.md", "docs/GUIDE.md"])
def test_links_into_benchmarks_and_the_guide_land(source):
    text = source.read_text(encoding="utf-8")
    targets = {"BENCHMARKS.md": DOC, "GUIDE.md": GUIDE}
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        file, _, anchor = link.partition("#")
        name = Path(file).name if file else source.name
        if name not in targets:
            continue
        missing_file = bool(file) and not (source.parent / file).is_file()
        if missing_file or (anchor and anchor not in _anchors(targets[name])):
            broken.append(link)
    assert broken == [], f"links in {source.name} to missing files or headings: {broken}"
