"""README.md is a user's guide that keeps up with the code: short, every option of every command's
--help in it, no paths of the machine it was written on, and every layer of the package named in
"How the code is laid out"."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from mosaic_export.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LAYOUT = "## How the code is laid out"
MAX_LINES = 300


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _help(*words: str) -> str:
    """What `mosaic-export WORDS --help` prints (in this process: argparse prints and exits 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main([*words, "--help"])
        except SystemExit as e:
            code = e.code
    assert code in (0, None), f"mosaic-export {' '.join(words)} --help failed ({code})"
    return out.getvalue()


def _subcommands(main_help: str) -> list[tuple[str, ...]]:
    """The subcommands the main help names: the lowercase words after `mosaic-export` at the start of
    a line ("mosaic-export profile detect --out me.toml" -> ("profile", "detect"))."""
    found = re.findall(r"^\s*mosaic-export((?: [a-z][a-z-]*)+)", main_help, flags=re.MULTILINE)
    return sorted({tuple(words.split()) for words in found})


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], str]:
    main = _help()
    subcommands = _subcommands(main)
    assert ("plan",) in subcommands and ("profile", "detect") in subcommands, subcommands
    texts = [_help(*words) for words in subcommands]
    return {(): main, **dict(zip(subcommands, texts, strict=True))}


def test_readme_is_short():
    lines = len(_readme().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines, at most {MAX_LINES}: move detail elsewhere"


def test_every_option_of_help_is_in_the_readme(helps):
    readme = _readme()
    options = {opt for text in helps.values() for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)}
    options.discard("--help")
    assert len(options) > 40, sorted(options)
    missing = sorted(opt for opt in options if not re.search(re.escape(opt) + r"(?![\w-])", readme))
    assert missing == [], f"options in --help but not in README.md: {missing}"


def test_readme_has_no_machine_paths():
    readme = _readme()
    found = [(n, line) for n, line in enumerate(readme.splitlines(), 1)
             for path in ("/tmp/", "/work/", "/home/", "/root/") if path in line]
    assert found == [], f"machine paths in README.md: {found}"


def _layout_section() -> str:
    readme = _readme()
    assert LAYOUT + "\n" in readme, f"README.md has no section {LAYOUT!r}"
    section = readme.split(LAYOUT + "\n", 1)[1]
    return re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]


def test_readme_says_how_the_code_is_laid_out():
    section = _layout_section()
    assert "tests/unit/test_layers.py" in section
    package = ROOT / "mosaic_export"
    packages = sorted(p.parent.relative_to(ROOT).as_posix()
                      for p in package.rglob("__init__.py") if p.parent != package)
    targets = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "targets").glob("*/__init__.py"))
    assert len(packages) >= 8 and len(targets) >= 2, (packages, targets)
    missing = []
    for path in packages:
        parts = path.split("/")
        # a layer (mosaic_export/run/) by its path; a package inside a layer (method/prune/) by its name
        name = f"`{path}/`" if len(parts) == 2 else f"`{parts[-1]}/`"
        if name not in section:
            missing.append(path)
    missing += [path for path in targets if f"`{path}/`" not in section]
    assert missing == [], f"packages not named in README.md's {LAYOUT!r}: {missing}"


def test_every_file_the_docs_name_exists():
    """A path of the project named in README.md or docs/GUIDE.md (`mosaic_export/...`, `targets/...`,
    `tools/...`, `tests/...`) is a file or folder that exists: the docs move with the code."""
    pattern = re.compile(r"(?<![\w/.])((?:mosaic_export|targets|tools|tests)/[\w/.]*\w)")
    named = set()
    for doc in (README, ROOT / "docs" / "GUIDE.md"):
        named |= set(pattern.findall(doc.read_text(encoding="utf-8")))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert len(named) > 20 and missing == []
