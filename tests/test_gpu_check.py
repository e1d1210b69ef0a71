"""benchmarks/gpu_check.sh on a machine without CUDA: its stages' CPU fallbacks (toy shapes) run with
starlette, uvicorn and gguf unimportable (as on the GPU host), a stage that runs out of time does not stop
the next, and --stages reruns chosen stages while summary.json keeps the others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback; with CUDA the script runs the real stages"),
    pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout"),
]


# The stage timeouts are sized for the GPU host; toy CPU runs on a shared 2-core machine get more.
SLOW_CPU = {"GPU_CHECK_BUDGET_S": "1500", **{f"GPU_CHECK_TIMEOUT_{n}": "300" for n in range(1, 8)}}


def run_check(out: Path, *args: str, env: dict | None = None, timeout: float = 1600) -> dict:
    full_env = {**os.environ, "PYTHON": sys.executable, **SLOW_CPU, **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)  # the script decides (conftest set it for this process)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out), *args], env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| stage | name | status |" in proc.stdout  # the table comes last
    return json.loads((out / "summary.json").read_text())


def test_timeout_does_not_stop_later_stages_and_reruns_merge(tmp_path):
    summary = run_check(
        tmp_path, "--cpu-fallback", "--block-imports", "--stages", "6,7", env={"GPU_CHECK_TIMEOUT_6": "1"}
    )
    stages = summary["stages"]
    assert summary["cuda"] is False
    assert stages["6"]["status"] == "timeout after 1s" and stages["6"]["rc"] in (124, 137)
    assert stages["7"]["status"] == "ok (cpu fallback)"
    profile = json.loads((tmp_path / "stage7_profile.json").read_text())
    assert profile["top"] and profile["batch"] == 4

    summary = run_check(tmp_path, "--cpu-fallback", "--block-imports", "--stages", "6")  # rerun the failed one
    assert summary["stages"]["6"]["status"] == "ok (cpu fallback)"
    assert summary["stages"]["7"]["status"] == "ok (cpu fallback)"  # kept from the first run
    decode = json.loads((tmp_path / "stage6_runner_decode.json").read_text())
    assert [r["batch"] for r in decode["rows"]] == [4, 4, 1, 1, 1]
    assert all(r["gpu_ms"] > 0 and r["host_ms"] > 0 for r in decode["rows"])
    assert 0 < decode["p7"]["bound"] < 1


def test_without_cuda_and_fallback_cuda_stages_skip(tmp_path):
    summary = run_check(tmp_path, "--stages", "1,3,5", "--block-imports")
    assert summary["stages"]["3"]["status"] == summary["stages"]["5"]["status"] == "skipped: no CUDA"
    assert summary["stages"]["1"]["status"] == "ok"
    env = json.loads((tmp_path / "stage1_env.json").read_text())
    for blocked in ("starlette", "uvicorn", "gguf"):  # --block-imports really hid them
        assert env["versions"][blocked].startswith("not importable"), env["versions"]
    assert env["versions"]["torch"] == torch.__version__ and env["sdpa"] == {"status": "no CUDA"}


@pytest.mark.slow
def test_cpu_fallback_of_the_other_stages(tmp_path):
    summary = run_check(tmp_path, "--cpu-fallback", "--block-imports", "--stages", "2,3,4,5")
    statuses = {k: s["status"] for k, s in summary["stages"].items()}
    assert all(v == "ok (cpu fallback)" for v in statuses.values()), statuses
    smoke = json.loads((tmp_path / "stage2_kernel_smoke.json").read_text())
    assert smoke["interpreter"] and smoke["all_pass"] and len(smoke["rows"]) == 6
    e2e = json.loads((tmp_path / "stage4_e2e.json").read_text())
    assert e2e["float32_greedy"]["same_as_peft"] and all(r["pass_"] for r in e2e["bf16_logits"])
    bench = json.loads((tmp_path / "stage5_kernel_bench.json").read_text())
    assert bench["rows"] and all(r["r_max"] == 64 for r in bench["rows"])
