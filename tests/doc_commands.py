"""What the documentation shows: the fenced blocks of README.md and of every docs/**/*.md page,
the `python -m ...`, `xattn ...` and `make ...` commands in them, and their Python blocks (issue 22).

A bash block's lines are commands (a trailing `\\` continues one); in a block that uses a prompt,
only the `$ ` lines are (a `> ` line continues one) and the rest is output. Comments are dropped
and whitespace is normalised, so `Command.text` is what a skip list can name. Nothing here runs
anything: tests/test_commands.py does, tests/test_readme.py executes the Python blocks.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
# `python -m X`, `xattn CMD` or `make T`, maybe after VAR=value settings, or a shell loop or test
# running one.
COMMAND = re.compile(r"^(\w+=\S*\s+)*(python -m \S|xattn\s|make(\s|$))"
                     r"|^(for|while|until|if)\s.*\bpython -m \S")
SHELL_LANGS = ("bash", "sh", "shell", "zsh", "console")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repo: README.md, docs/serving.md
    line: int  # the opening fence's line (1-based)
    lang: str  # the info string's first word: bash, python, text, or ""
    lines: tuple[str, ...]  # the content, dedented to the fence's indentation

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Command:
    text: str  # normalised: no prompt, no comment, continuations joined, single spaces
    where: str  # page:line of its first line
    block: str  # page:line of its block: commands of one block run in one folder, in order
    comment: str = ""  # its trailing `# ...` comment, if any

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def doc_pages(repo: str = REPO) -> list[str]:
    """README.md, then every Markdown page under docs/ (sorted), relative to `repo`."""
    pages = ["README.md"] if os.path.isfile(os.path.join(repo, "README.md")) else []
    found = glob.glob(os.path.join(repo, "docs", "**", "*.md"), recursive=True)
    return pages + sorted(os.path.relpath(p, repo) for p in found)


def fenced_blocks(page: str, repo: str = REPO) -> list[Block]:
    """The fenced code blocks of one Markdown page (``` or ~~~, indented ones in lists too)."""
    with open(os.path.join(repo, page), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        blocks.append(Block(page, i + 1, lang.lower(), tuple(body)))
        i = j + 1
    return blocks


def all_blocks(repo: str = REPO) -> list[Block]:
    return [b for page in doc_pages(repo) for b in fenced_blocks(page, repo)]


def python_blocks(repo: str = REPO) -> list[str]:
    """The source of every ```python block, README first."""
    return ["\n".join(b.lines) + "\n" for b in all_blocks(repo) if b.lang == "python"]


def _normalise(text: str) -> tuple[str, str]:
    """(command, comment), whitespace normalised."""
    try:
        words = shlex.split(text)
    except ValueError:  # an unbalanced quote: keep the text as written
        words = text.split()
    cut = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))
    return " ".join(words[:cut]), " ".join(words[cut:]).lstrip("# ")


def block_commands(block: Block) -> list[Command]:
    """Every shell command of a block, joined and normalised: a shell block's lines, or the
    `$ ` lines of a block showing a session (its other lines are output)."""
    prompted = any(line.startswith("$ ") for line in block.lines)
    if not prompted and block.lang not in SHELL_LANGS:
        return []  # output, a tree, code of another language
    found: list[list] = []  # [first line number, text]
    open_ = False  # the last command continues on the next line
    for offset, raw in enumerate(block.lines):
        line, number = raw.rstrip(), block.line + 1 + offset
        if open_ or (prompted and found and line.startswith("> ")):
            text = found[-1][1]  # `> `: the shell's next line, where a newline separates commands
            joint = " " if open_ else "; "
            found[-1][1] = text.rstrip("\\") + joint + (line[2:] if line.startswith("> ") else line)
        elif prompted:
            if line.startswith("$ "):
                found.append([number, line[2:]])
            elif found and not line.startswith("> "):
                found.append([number, ""])  # output: ends the command above
        elif line.strip() and not line.strip().startswith("#"):
            found.append([number, line])
        open_ = line.endswith("\\")
    commands = []
    for number, text in found:
        text, comment = _normalise(text)
        if text and COMMAND.search(text):
            commands.append(Command(text, f"{block.page}:{number}", block.where, comment))
    return commands


def commands(repo: str = REPO) -> list[Command]:
    """Every `python -m ...` and `make ...` command shown in a fenced block, in page order."""
    return [c for b in all_blocks(repo) for c in block_commands(b)]
