"""Helpers shared by the benchmark scripts. Each script runs as `python benchmarks/NAME.py`, which puts
this folder on sys.path, so they import it as `benchutil`."""

from __future__ import annotations

import platform
import socket
from pathlib import Path

RESULTS_MD = Path(__file__).with_name("RESULTS.md")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_results_section(section: str, begin: str, end: str, heading: str, results: Path = RESULTS_MD) -> None:
    """Put `section` (which starts with the `begin` marker and ends with `end`) into results in place of
    the previous one, or append it under `heading` the first time."""
    body = results.read_text()
    if begin in body:
        body = body[: body.index(begin)] + section + body[body.index(end) + len(end) :]
    else:
        body += f"\n## {heading}\n\n{section}\n"
    results.write_text(body)
    print(f"updated {results}")
