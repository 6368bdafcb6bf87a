"""The pages users read (README.md and the docs site's docs/**/*.md), and their code blocks.

Tests find an example by what it contains, on whichever page holds it, so moving a block between
pages changes no test. A block shown on two pages must be the same text on both.
"""

from __future__ import annotations

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def pages() -> list[str]:
    """README.md, then every page of the docs site, as paths."""
    docs = sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
    return [os.path.join(REPO, "README.md"), *docs]


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def blocks(lang: str | None = None) -> list[tuple[str, str]]:
    """(page relative to the repo, code) of every fenced block, of one language if given."""
    found = []
    for path in pages():
        for match in FENCE.finditer(read(path)):
            if lang is None or match.group(1) == lang:
                found.append((os.path.relpath(path, REPO), match.group(2)))
    return found


def block(lang: str, needle: str) -> str:
    """The one `lang` block holding `needle` (the same text wherever it is shown)."""
    texts = {code for _, code in blocks(lang) if needle in code}
    where = sorted({page for page, code in blocks(lang) if needle in code})
    assert len(texts) == 1, f"{len(texts)} different {lang} blocks hold {needle!r} (pages: {where})"
    return texts.pop()


def page_holding(marker: str) -> str:
    """The path of the one page that holds `marker`."""
    holding = [path for path in pages() if marker in read(path)]
    assert len(holding) == 1, f"{marker!r} is on {len(holding)} pages: {holding}"
    return holding[0]


def all_text() -> str:
    """Every page, joined: for what must be said somewhere."""
    return "\n".join(read(path) for path in pages())
