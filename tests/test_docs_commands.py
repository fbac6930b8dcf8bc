"""Every `meerkat-hf ...` command the README and docs/ print parses with today's CLI, and the files it names exist.

Docs drift from code one flag at a time; this reads each command out of the markdown (code blocks and
inline code), parses it with `meerkat_hf.cli.build_parser()` (nothing runs), and checks that every
`--config`/`examples/...` path in it is in the repository. A command with a `...` placeholder is skipped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from meerkat_hf.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("README.md"))]


def _commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = re.sub(r"\\\n\s*", " ", doc.read_text(encoding="utf-8"))  # shell line continuations
        for line in text.splitlines():
            for match in re.finditer(r"(?:^|[`&;]\s*|HF_HUB_OFFLINE=1 )(meerkat-hf [^`#\n]*)", line):
                command = match.group(1).strip()
                if "..." not in command and "<" not in command:
                    found.append((f"{doc.relative_to(ROOT)}: {command}", command))
    return found


COMMANDS = _commands()


def test_the_docs_print_commands():
    assert len(COMMANDS) >= 8, [c for c, _ in COMMANDS]  # the reader above still finds them


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses_and_names_existing_files(where, command):
    argv = shlex.split(command)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:  # --version / --help exit 0 after printing
        if exit_.code not in (0, None):
            pytest.fail(f"{where}: argparse refused it (exit {exit_.code})")
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config" or value.startswith("examples/"):
            assert (ROOT / value).exists(), f"{where}: {value} does not exist"
