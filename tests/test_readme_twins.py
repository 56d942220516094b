"""README_ZH.md is README.md in Simplified Chinese: the prose is translated, everything else is
the same. These tests keep the two in step, so that an edit to one that is not carried over to the
other fails here with a message saying what differs: the code (every fenced or indented block,
byte for byte and in order), the configuration variables named, the sections, the tables, the
links, and a link from each to the other."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGLISH = ROOT / "README.md"
CHINESE = ROOT / "README_ZH.md"

FENCE = re.compile(r"^(`{3,}|~{3,})[^\n]*\n.*?^\1[ \t]*$", re.S | re.M)
# A backticked configuration name, alone or with a value: `LOG_CHAT`, `LOG_CHAT=true`.
VARIABLE = re.compile(r"`([A-Z][A-Z0-9_]{2,})(?:=[^`\n]*)?`")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t]*$", re.M)
LINK = re.compile(r"\]\(([^()\s]+)\)")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[str]:
    return [m.group(0) for m in FENCE.finditer(text)]


def indented_blocks(text: str) -> list[str]:
    """Indented code blocks: runs of lines indented by 4 or more spaces that follow a blank line
    (list items here continue with 2 spaces, so they are not taken)."""
    blocks: list[str] = []
    current: list[str] = []
    previous = ""
    for line in FENCE.sub("", text).splitlines():
        if line.startswith("    ") and (current or not previous.strip()):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
        previous = line
    if current:
        blocks.append("\n".join(current))
    return blocks


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2)) for m in HEADING.finditer(prose(text))]


def variables(text: str) -> set[str]:
    return set(VARIABLE.findall(prose(text)))


def tables(text: str) -> list[tuple[int, int]]:
    """(rows, columns) of every table, header and delimiter rows included."""
    found: list[tuple[int, int]] = []
    rows: list[str] = []
    for line in [*prose(text).splitlines(), ""]:
        if line.startswith("|"):
            rows.append(line)
            continue
        if rows:
            found.append((len(rows), rows[0].count("|") - 1))
            rows = []
    return found


def links(text: str) -> set[str]:
    """Link targets outside code, with a translation's file named as its original
    (deploy_ZH.md as deploy.md, README_ZH.md as README.md)."""
    return {re.sub(r"_ZH\.md\b", ".md", target) for target in LINK.findall(prose(text))}


def diff(a: str, b: str) -> str:
    lines = difflib.unified_diff(
        a.splitlines(), b.splitlines(), "README.md", "README_ZH.md", lineterm=""
    )
    return "\n".join(lines)


def test_each_links_to_the_other():
    english, chinese = read(ENGLISH), read(CHINESE)
    assert "](README_ZH.md)" in prose(english), "README.md has no link to README_ZH.md"
    assert "](README.md)" in prose(chinese), "README_ZH.md has no link to README.md"


def test_the_same_fenced_code_blocks_in_the_same_order():
    english, chinese = fenced_blocks(read(ENGLISH)), fenced_blocks(read(CHINESE))
    for number, (a, b) in enumerate(zip(english, chinese, strict=False), 1):
        assert a == b, f"fenced code block {number} differs:\n{diff(a, b)}"
    extra_en = "\n\n".join(english[len(chinese) :])
    extra_zh = "\n\n".join(chinese[len(english) :])
    assert len(english) == len(chinese), (
        f"README.md has {len(english)} fenced code blocks, README_ZH.md {len(chinese)}; "
        f"only in README.md:\n{extra_en}\nonly in README_ZH.md:\n{extra_zh}"
    )


def test_the_same_indented_code_blocks():
    english, chinese = indented_blocks(read(ENGLISH)), indented_blocks(read(CHINESE))
    assert english == chinese, "indented code blocks differ:\n" + diff(
        "\n\n".join(english), "\n\n".join(chinese)
    )


def test_the_same_configuration_variables():
    english, chinese = variables(read(ENGLISH)), variables(read(CHINESE))
    assert english == chinese, (
        f"backticked variable names only in README.md: {sorted(english - chinese)}; "
        f"only in README_ZH.md: {sorted(chinese - english)}"
    )


def test_the_same_sections():
    english, chinese = headings(read(ENGLISH)), headings(read(CHINESE))

    def listing(found: list[tuple[int, str]]) -> str:
        return "\n".join(f"  {'#' * level} {title}" for level, title in found)

    sections_en = [h for h in english if h[0] == 2]
    sections_zh = [h for h in chinese if h[0] == 2]
    assert len(sections_en) == len(sections_zh), (
        f"README.md has {len(sections_en)} '##' sections, README_ZH.md {len(sections_zh)}:\n"
        f"README.md:\n{listing(sections_en)}\nREADME_ZH.md:\n{listing(sections_zh)}"
    )
    levels_en = [level for level, _ in english]
    levels_zh = [level for level, _ in chinese]
    assert levels_en == levels_zh, (
        f"the headings' levels differ:\nREADME.md:\n{listing(english)}\n"
        f"README_ZH.md:\n{listing(chinese)}"
    )


def test_the_same_tables():
    english, chinese = tables(read(ENGLISH)), tables(read(CHINESE))
    assert english == chinese, (
        f"tables as (rows, columns) differ: README.md {english}, README_ZH.md {chinese}"
    )


def test_the_same_links():
    english, chinese = links(read(ENGLISH)), links(read(CHINESE))
    assert english == chinese, (
        f"link targets only in README.md: {sorted(english - chinese)}; "
        f"only in README_ZH.md: {sorted(chinese - english)}"
    )
