"""README quotes the committed report; a quote must say what the report says."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUOTE = re.compile(r"<!-- quoted from (\S+), (.+?) \(.*?\) -->\n(.*?)\n<!-- end of quote -->", re.S)


def quotes(readme: str) -> list[tuple[str, str, str]]:
    return QUOTE.findall(readme)


def section_table(report: str, title: str) -> str:
    section = report.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_readme_quotes_match_the_report():
    found = quotes((REPO / "README.md").read_text())
    assert found, "README quotes no report table"
    for source, title, quoted in found:
        assert quoted == section_table((REPO / source).read_text(), title), f"README's {title} differs from {source}"


def test_a_changed_number_is_caught():
    """A number changed in the report's quoted table makes the quote differ from what section_table reads."""
    source, title, quoted = quotes((REPO / "README.md").read_text())[0]
    report = (REPO / source).read_text()
    head, table = report.split(f"## {title}", 1)
    number = re.search(r"\| \d\.\d{3} ", table)
    assert number, "the quoted table holds no three-decimal number to change"
    digit = number.end() - 2
    changed = table[:digit] + ("1" if table[digit] != "1" else "2") + table[digit + 1:]
    assert section_table(f"{head}## {title}{changed}", title) != quoted
