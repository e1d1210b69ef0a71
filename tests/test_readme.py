"""The README documents every CLI flag (so it cannot drift from the parser silently)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.cli import build_parser


def _subcommands():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_flag_is_in_the_readme(command):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"loraplex {command}" in readme
    flags = [o for a in _subcommands()[command]._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    missing = [f for f in flags if f not in readme]
    assert not missing, f"README does not mention {command} flags {missing}"
