"""Helpers shared by the benchmark scripts. Each script runs as `python benchmarks/NAME.py`, which puts
this folder on sys.path, so they import it as `benchutil`."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
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


def cpu_flags(prefixes: tuple[str, ...] = ("avx512", "amx")) -> list[str]:
    """The CPU's feature flags (/proc/cpuinfo) that start with one of `prefixes`, sorted; [] if unknown.
    The default names what the bf16 matmuls depend on (AVX-512 with bf16, AMX tiles)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(prefixes))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """What a result depends on: CPU name and its AVX-512/AMX flags, cores, torch and its threads."""
    import torch  # here: some scripts run without it

    return {
        "cpu_name": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def git_commit(root: Path) -> str:
    """Short commit of the checkout at `root`, with "+dirty" when it has uncommitted changes; "?" if
    it is not a git checkout."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "?"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


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
