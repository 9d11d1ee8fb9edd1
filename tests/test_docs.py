"""The documentation: every relative link resolves (files and headings), the demo's time table equals
the demo's constants, and no page points at documents outside the repository's own vocabulary."""

import re
from pathlib import Path

import pytest

from pumit_seg.app import demo

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6} +(.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_demo_time_table_matches_the_demo():
    text = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
    table = text.split("<!-- expected-minutes")[1].split("<!-- /expected-minutes -->")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in demo.EXPECTED_MINUTES:
            rows[(cells[0], cells[1])] = [float(c) for c in cells[2:]]
    for setting, devices in demo.EXPECTED_MINUTES.items():
        for device, parts in devices.items():
            expected = [parts.get(p, 0.0) for p in demo.PARTS] + [demo.expected_minutes(setting, device)]
            assert rows.get((setting, device)) == pytest.approx(expected), (setting, device)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_internal_references(page):
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"\bSPEC\b|\bissue \d+|(?<![\w&/])#\d+\b", text), page.name


# Source files still being rewritten elsewhere; they are exempt from the check below until then.
# Empty this set (and drop the exemption) once they no longer cite internal documents.
PENDING_CLEANUP: set[str] = set()  # files exempt while being rewritten (none now)
# A citation of a document a user who clones the repository does not have: the internal specification,
# an issue number, the internal architecture notes. (`"SPEC" not in text`, a string literal, is allowed.)
INTERNAL_REFERENCE = re.compile(r"\bSPEC\b(?!\")|\b[Ii]ssues? #?\d+|\.\./shared/|\bARCHITECTURE\.md")


def source_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] == "build" or any(part.startswith(".") for part in rel.split("/")):
            continue
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in PENDING_CLEANUP):
            continue
        files.append(path)
    return files


def test_no_internal_references_in_code():
    """Comments, docstrings and --help texts point at docs/, never at documents outside the repository."""
    found = []
    for path in source_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if INTERNAL_REFERENCE.search(line):
                found.append(f"{path.relative_to(ROOT).as_posix()}:{number}: {line.strip()}")
    assert not found, "internal references (point at docs/ instead):\n" + "\n".join(found)
