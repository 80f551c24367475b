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
    source, title, quoted = quotes((REPO / "README.md").read_text())[0]
    report = (REPO / source).read_text()
    number = re.search(r"\d\.\d{3}", quoted)
    assert number, "the quote holds no three-decimal number to change"
    last = number.group()[-1]
    changed = quoted[:number.end() - 1] + ("1" if last != "1" else "2") + quoted[number.end():]
    assert changed != section_table(report, title)
