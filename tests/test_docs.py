"""The documentation holds together: relative links resolve, the README stays a short guide, and every results
table names the command that made it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
COMMAND_MARKS = ("cmg ", "bench/", ".venv/bin/")


def doc_files(repo: Path = REPO) -> list[Path]:
    files = [repo / "README.md", repo / "CONTRIBUTING.md", *sorted((repo / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def broken_links(path: Path) -> list[str]:
    """Relative Markdown links (and images) of `path` whose target file does not exist."""
    bad = []
    for i, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(line):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s)://, mailto:, pure anchors
            file_part = target.split("#", 1)[0].split("?", 1)[0]
            if not file_part or not (path.parent / file_part).exists():
                label = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
                bad.append(f"{label}:{i}: {target}")
    return bad


def tables_without_command(path: Path) -> list[str]:
    """Tables of `path` with no line naming a command between the section's heading and the table."""
    bad, section, in_table = [], [], False
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if re.match(r"^#{1,6}\s", line):
            section, in_table = [], False
            continue
        is_row = line.lstrip().startswith("|")
        if is_row and not in_table:
            in_table = True
            if not any(mark in prev for prev in section for mark in COMMAND_MARKS):
                bad.append(f"{path.name}:{i}: {line.strip()[:60]}")
        elif not is_row:
            in_table = False
        section.append(line)
    return bad


def doc_ids() -> list[str]:
    return [str(f.relative_to(REPO)) for f in doc_files()]


@pytest.mark.parametrize("name", doc_ids())
def test_relative_links_resolve(name):
    assert broken_links(REPO / name) == []


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.md").write_text("# ok\n")
    page = tmp_path / "README.md"
    page.write_text("[fine](docs/ok.md#top) [web](https://x.org) [anchor](#a) [mail](mailto:a@b.c)\n"
                    "```\n[in code](nowhere.md)\n```\n[gone](docs/missing.md#x) ![img](docs/img/none.png)\n")
    bad = broken_links(page)
    assert len(bad) == 2 and "docs/missing.md#x" in bad[0] and "docs/img/none.png" in bad[1]


def test_readme_is_a_short_guide():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move research into docs/ (at most {README_MAX_LINES})"


def test_every_docs_page_is_listed_in_the_index():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.name != "README.md" and
               f"]({p.name}" not in index]
    assert missing == []


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "docs").glob("results-*.md")))
def test_every_results_table_names_its_command(name):
    assert tables_without_command(REPO / "docs" / name) == []


def test_the_command_check_can_fail(tmp_path):
    page = tmp_path / "results-x.md"
    page.write_text("# x\n\n`.venv/bin/cmg experiment`:\n\n| a |\n|---|\n| 1 |\n\n## y\n\nno source:\n\n| b |\n|---|\n")
    assert tables_without_command(page) == ["results-x.md:13: | b |"]
