"""The documentation a newcomer reads: README.md stays short (at most 400 lines) and opens with
a table of contents, and every link of README.md and docs/ stays inside the repository and
points at a file (and a heading) that exists. Plain-text URLs are allowed only for a local
server (127.0.0.1 / localhost); code blocks and code spans are not links."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 400
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img|source|link)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
AUTOLINK = re.compile(r"<([a-z][a-z0-9+.-]*:[^>\s]*)>", re.I)
BARE_URL = re.compile(r"\b(?:https?|ftp)://[^\s)>\]`'\"]+", re.I)
WWW = re.compile(r"(?<![\w./-])www\.[a-z0-9-]+\.[a-z]", re.I)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "[::1]"}
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The page without fenced code blocks and code spans (their text is not a link)."""
    text = FENCE.sub("", text)
    return CODE_SPAN.sub("", text)


def links(text: str) -> list[str]:
    body = prose(text)
    found = INLINE_LINK.findall(body) + REFERENCE_DEFINITION.findall(body) + HTML_LINK.findall(body)
    found += AUTOLINK.findall(body)
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, title in HEADING.findall(FENCE.sub("", text)):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def link_problems(page: Path, text: str) -> list[str]:
    """Every way a link of ``page`` leaves the repository or points at nothing."""
    problems = []
    for target in links(text):
        where = f"{page.relative_to(REPO)}: ({target})"
        parts = urlsplit(target)
        if parts.scheme or target.startswith("//"):
            problems.append(f"{where} points outside the repository")
            continue
        if target.startswith("/"):
            problems.append(f"{where} is an absolute path: use a path relative to the page")
            continue
        path = unquote(parts.path)
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(REPO):
            problems.append(f"{where} points outside the repository")
        elif not file.exists():
            problems.append(f"{where} names a file that does not exist")
        elif (
            parts.fragment
            and file.suffix == ".md"
            and parts.fragment not in anchors(text if not path else file.read_text())
        ):
            problems.append(f"{where} names a heading that {file.relative_to(REPO)} does not have")
    body = prose(text)
    for pattern in (INLINE_LINK, REFERENCE_DEFINITION, HTML_LINK, AUTOLINK):
        body = pattern.sub("", body)  # reported above
    for url in BARE_URL.findall(body):
        if urlsplit(url).netloc.split(":")[0] not in LOCAL_HOSTS and not url.startswith("http://[::1]"):
            problems.append(f"{page.relative_to(REPO)}: {url} (a plain URL) points outside the repository")
    problems += [
        f"{page.relative_to(REPO)}: {m} (a plain URL) points outside the repository" for m in WWW.findall(body)
    ]
    return problems


def toc_problems(text: str) -> list[str]:
    """The README opens with a table of contents that lists every section and whose links
    lead to headings of the README."""
    match = re.search(r"^##\s+(?:Table of )?Contents\s*\n(.*?)(?=^#{1,2}\s)", text, re.M | re.S | re.I)
    if match is None:
        return ["README.md has no '## Contents' section (table of contents)"]
    entries = re.findall(r"\]\(#([^)]+)\)", match.group(1))
    problems = []
    if len(entries) < 5:
        problems.append(f"the table of contents lists {len(entries)} sections")
    known = anchors(text)
    problems += [f"table of contents: #{e} is not a heading of README.md" for e in entries if e not in known]
    sections = [slug(t) for level, t in HEADING.findall(FENCE.sub("", text)) if level == "##"]
    problems += [
        f"section #{s} is missing from the table of contents"
        for s in sections
        if s not in entries + ["contents", "table-of-contents"]
    ]
    first_section = min((m.start() for m in re.finditer(r"^##\s", text, re.M)), default=0)
    if match.start() != first_section:
        problems.append("the table of contents is not the README's first section")
    return problems


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move details into docs/ and link them"
    )


def test_readme_opens_with_a_table_of_contents():
    assert toc_problems(README.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_inside_the_repository_and_resolve(page: Path):
    assert link_problems(page, page.read_text()) == []


def test_the_checks_catch_what_they_guard_against():
    """The checks themselves: each kind of bad link and a missing table of contents is found."""
    page = README
    bad = [
        "[spec](../shared/spec/API.md)",  # leaves the repository
        "[site](https://example.com/x)",  # another site
        "[gone](docs/no-such-page.md)",  # a file that does not exist
        "[anchor](docs/operating.md#no-such-heading)",  # a heading that does not exist
        "[root](/etc/passwd)",  # an absolute path
        "<https://example.com>",  # an autolink
        "see https://example.org/page for more",  # a plain URL
        "see www.example.org for more",  # a plain web address
        '<a href="https://example.net">x</a>',  # HTML
        "[ref]: https://example.com/ref",  # a reference definition
    ]
    for line in bad:
        assert len(link_problems(page, line)) == 1, (line, link_problems(page, line))
    fine = "[ok](docs/operating.md#probes) `[code](https://example.com)` http://127.0.0.1:8000/console\n```\nhttps://example.com\n```\n"
    assert link_problems(page, fine) == []
    assert toc_problems("# T\n\n## Intro\n\ntext\n") != []
    assert toc_problems("# T\n\n## Contents\n\n- [A](#a)\n\n## A\n") != []  # fewer than five entries
