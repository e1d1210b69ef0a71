"""Closed-loop server throughput with adapters of different ranks and targets, against the base model, on
one real `loraplex serve` (issue 15).

One server (the default model, `--dtype`, the default --max-lora-rank unless given, a device slot for
every adapter of every case) serves every adapter of the chosen cases. Each case is one closed-loop `loraplex bench` point: `--concurrency` streamed chat
requests in flight at all times, `--output-len` greedy tokens each (ignore_eos: every request produces
all of them), the bench's default prompt, `--duration` seconds, `--warmup` short requests before it.

    base        the base model, no adapter
    r8-all      rank 8 on all seven linears
    r16-qv      rank 16 on q_proj, v_proj
    r32-gateup  rank 32 on gate_proj, up_proj
    r64-all     rank 64 on all seven linears
    r64-odown   rank 64 on o_proj, down_proj
    mixed6      6 small adapters of mixed ranks and targets, requests spread uniformly over them

A round runs every case once, base first; "kept" = the case's output tok/s / the base tok/s of the SAME
round (a slow spell of a shared machine hits a round's rows alike); the table shows the median kept over
`--rounds` and the tok/s of every round. Targets: a single adapter keeps >= 0.85x, mixed6 >= 0.8x.

`--loraplex-root DIR` serves another checkout of the repository (e.g. the previous main, for a baseline
in the same sitting): the server runs with a temp dir holding `loraplex -> DIR` first on its PYTHONPATH.

    python benchmarks/server_adapters.py [--dtype bfloat16|float32] [--rounds 2] [--duration 20]
        [--cases base,r8-all,...] [--loraplex-root DIR] [--extra-args "--flag value"] [--max-lora-rank R]
        [--out benchmarks/out/server_adapters.json] [--write-results] [--label NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from benchutil import free_port, git_commit, machine_info, write_results_section
from compare import OtherLoad, ServerProcess, wait_for_quiet

from loraplex.bench import BenchConfig, LengthSpec, run_benchmark
from loraplex.engine.demo_adapters import ALL_LINEAR_MODULES, ATTENTION_MODULES, MLP_MODULES

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

QV = ("q_proj", "v_proj")
ATTN, MLP, ALL = ATTENTION_MODULES, MLP_MODULES, ALL_LINEAR_MODULES


@dataclass(frozen=True)
class AdapterCase:
    """One adapter of a case: its served name, rank and target modules."""

    name: str
    r: int
    targets: tuple[str, ...]


# case -> its adapters (requests spread uniformly over them); () = the base model
CASES: dict[str, tuple[AdapterCase, ...]] = {
    "base": (),
    "r8-all": (AdapterCase("r8-all", 8, ALL),),
    "r16-qv": (AdapterCase("r16-qv", 16, QV),),
    "r32-gateup": (AdapterCase("r32-gateup", 32, ("gate_proj", "up_proj")),),
    "r64-all": (AdapterCase("r64-all", 64, ALL),),
    "r64-odown": (AdapterCase("r64-odown", 64, ("o_proj", "down_proj")),),
    "mixed6": (
        AdapterCase("mix-r4-qv", 4, QV),
        AdapterCase("mix-r8-all", 8, ALL),
        AdapterCase("mix-r8-qkvo", 8, ATTN),
        AdapterCase("mix-r16-gud", 16, MLP),
        AdapterCase("mix-r16-qv", 16, QV),
        AdapterCase("mix-r32-qk", 32, ("q_proj", "k_proj")),
    ),
}
SINGLE_TARGET, MIXED_TARGET = 0.85, 0.8
CACHE_TAG = "bench-server-adapters-v1"  # bump when the adapters' recipe changes


def target_of(case: str) -> float | None:
    """The kept ratio a case must reach (None: the base itself)."""
    adapters = CASES[case]
    if not adapters:
        return None
    return SINGLE_TARGET if len(adapters) == 1 else MIXED_TARGET


def short_targets(targets: tuple[str, ...]) -> str:
    if targets == ALL:
        return "all"
    return "+".join(t.removesuffix("_proj") for t in targets)


def describe(case: str) -> str:
    """'r16 q+v' style list of a case's adapters."""
    return ", ".join(f"r{a.r} {short_targets(a.targets)}" for a in CASES[case]) or "-"


def prepare_adapters(adapters: list[AdapterCase]) -> dict[str, Path]:
    """name -> folder of each adapter (seeded, bf16, fitted to the default model), written once under
    the loraplex cache dir and reused by later runs."""
    import torch

    from loraplex.engine.default_model import default_cache_dir
    from loraplex.engine.demo_adapters import DemoAdapterSpec, write_lora_adapter
    from loraplex.engine.loader import base_shapes_of, resolve_model_dir

    model_dir = resolve_model_dir(None)
    shapes = base_shapes_of(model_dir)
    root = default_cache_dir() / CACHE_TAG
    out = {}
    every = [a for case in CASES.values() for a in case]
    for a in adapters:
        folder = root / a.name
        if not (folder / "adapter_config.json").is_file():  # written last by write_lora_adapter
            seed = 1500 + every.index(a)  # the same weights whichever subset of cases wrote them
            spec = DemoAdapterSpec(a.name, r=a.r, lora_alpha=2 * a.r, target_modules=a.targets, seed=seed, b_std=0.002)
            write_lora_adapter(folder, spec, shapes, str(model_dir), dtype=torch.bfloat16)
        out[a.name] = folder
    return out


def served_env(loraplex_root: Path | None, tmp: Path) -> dict[str, str]:
    """The server's environment: with `loraplex_root`, a temp dir holding `loraplex -> loraplex_root`
    goes first on PYTHONPATH (the repository root is the package itself)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if loraplex_root is not None:
        shim = tmp / "pythonpath"
        shim.mkdir(exist_ok=True)
        link = shim / "loraplex"
        if not link.exists():
            link.symlink_to(loraplex_root.resolve(), target_is_directory=True)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
    return env


def served_package(env: dict[str, str]) -> str:
    """Where `import loraplex` resolves in the server's environment (checks --loraplex-root took)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import loraplex, os; print(os.path.dirname(os.path.realpath(loraplex.__file__)))"],
        env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    if probe.returncode != 0:
        raise SystemExit(f"the server's python cannot import loraplex:\n{probe.stderr[-2000:]}")
    return probe.stdout.strip()


class Server(ServerProcess):
    """compare.ServerProcess (own process group, SIGTERM then SIGKILL), ready when /ready answers 200."""

    def wait_ready_http(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s; see {self.log_path}")

    def base_name(self) -> str:
        """The base model's name: the /v1/models card without a parent."""
        cards = httpx.get(f"{self.url}/v1/models", timeout=30).raise_for_status().json()["data"]
        base = [c["id"] for c in cards if c.get("parent") is None and c.get("tier", "base") == "base"]
        if not base:
            raise RuntimeError(f"no base model among /v1/models: {[c['id'] for c in cards]}")
        return base[0]


def serve_argv(args, adapters: dict[str, Path], port: int) -> list[str]:
    argv = [sys.executable, "-m", "loraplex.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype]
    if args.max_lora_rank is not None:
        argv += ["--max-lora-rank", str(args.max_lora_rank)]
    if adapters:  # slots for every adapter of every case, so a --cases subset runs the same server config
        argv += ["--max-active-adapters", str(sum(len(a) for a in CASES.values()))]
    for name, folder in adapters.items():
        argv += ["--adapter", f"{name}={folder}"]
    return argv + shlex.split(args.extra_args)


def run_point(server: Server, args, case: str, base_name: str, label: str) -> dict:
    models = tuple(a.name for a in CASES[case]) or (base_name,)
    cfg = BenchConfig(
        url=server.url, endpoint="chat", models=models, popularity="uniform", concurrency=args.concurrency,
        num_requests=10**6, duration=args.duration, timeout=args.timeout, output_len=LengthSpec.parse(args.output_len),
        temperature=0.0, ignore_eos=True, warmup=args.warmup, seed=args.seed,
    )  # fmt: skip
    session = os.getsid(server.proc.pid)
    wait_for_quiet(session, args.quiet_wait)
    meter = OtherLoad(session)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = asyncio.run(run_benchmark(cfg, progress=not args.no_progress, label=label))
    client_cores = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)  # this load generator's own CPU
    s = result.summary
    return {
        "case": case,
        "models": list(models),
        "tok_s": s["output_throughput"],
        "num_ok": s["num_ok"],
        "num_errors": s["num_errors"],
        "errors": s["errors"],
        "distinct_models": s["distinct_models"],
        "tpot_p50": s["tpot"]["p50"],
        "ttft_p50": s["ttft"]["p50"],
        "other_load_cores": meter.cores(),
        "client_cores": client_cores,
        "summary": s,
    }


def summarize_cases(points: list[dict], cases: list[str], rounds: int) -> list[dict]:
    """One row per case: tok/s per round, kept per round (against the same round's base) and its median."""
    rows = []
    for case in cases:
        mine = sorted((p for p in points if p["case"] == case), key=lambda p: p["round"])
        tok = [p["tok_s"] for p in mine]
        kept = []
        for p in mine:
            base = next((b for b in points if b["case"] == "base" and b["round"] == p["round"]), None)
            if base and base["tok_s"] > 0:
                kept.append(p["tok_s"] / base["tok_s"])
        median_kept = statistics.median(kept) if kept else None
        target = target_of(case)
        verdict = None if target is None or median_kept is None else ("met" if median_kept >= target else "missed")
        rows.append(dict(
            case=case, adapters=describe(case), num_adapters=len(CASES[case]), tok_s_per_round=tok,
            kept_per_round=kept, kept=median_kept, target=target, verdict=verdict,
            errors=sum(p["num_errors"] for p in mine), other_load_cores=max((p["other_load_cores"] for p in mine), default=0.0),
            tpot_p50_ms=statistics.median([1000 * p["tpot_p50"] for p in mine if p["tpot_p50"] is not None] or [0.0]),
        ))  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| case | adapters | out tok/s per round | kept per round | kept (median) | target | TPOT p50 (ms) | errors | other load (cores) |",
        "|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        tok = ", ".join(f"{t:.1f}" for t in r["tok_s_per_round"])
        kept_rounds = ", ".join(f"{k:.3f}" for k in r["kept_per_round"]) if r["case"] != "base" else "-"
        kept = "-" if r["kept"] is None or r["case"] == "base" else f"**{r['kept']:.3f}**"
        target = "" if r["target"] is None else f">= {r['target']:g}x: {r['verdict'] or '-'}"
        lines.append(
            f"| {r['case']} | {r['adapters']} | {tok} | {kept_rounds} | {kept} | {target} | {r['tpot_p50_ms']:.1f} "
            f"| {r['errors']} | {r['other_load_cores']:.2f} |"
        )
    return "\n".join(lines)


def parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {list(CASES)}")
    if "base" not in cases:
        print("note: 'base' added: every kept ratio is against the same round's base", flush=True)
    return ["base"] + [c for c in dict.fromkeys(cases) if c != "base"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)} (base always runs, first)")
    ap.add_argument("--rounds", type=int, default=2, help="each round runs every case once")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per point")
    ap.add_argument("--concurrency", type=int, default=16, help="streamed requests in flight")
    ap.add_argument("--output-len", default="64", help="output tokens per request")
    ap.add_argument("--warmup", type=int, default=16, help="short requests before each point")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-lora-rank", type=int, default=None, help="passed to serve only when given")
    ap.add_argument("--extra-args", default="", help="more `loraplex serve` flags, one shell-quoted string")
    ap.add_argument("--loraplex-root", default=None, help="serve this checkout of the repository instead")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--quiet-wait", type=float, default=30.0, help="before each point, wait up to this long for an idle CPU")
    ap.add_argument("--out", default=str(HERE / "out" / "server_adapters.json"))
    ap.add_argument("--write-results", action="store_true", help="put a section into benchmarks/RESULTS.md")
    ap.add_argument("--label", default="", help="suffix of the RESULTS.md section (e.g. baseline): keeps runs apart")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1 or args.duration <= 0:
        raise SystemExit("--rounds must be >= 1 and --duration > 0")
    cases = parse_cases(args.cases)
    root = Path(args.loraplex_root).resolve() if args.loraplex_root else None
    if root is not None and not (root / "__init__.py").is_file():
        raise SystemExit(f"--loraplex-root {root} is not a loraplex checkout (no __init__.py)")
    command = "python benchmarks/server_adapters.py " + shlex.join(sys.argv[1:])
    t0 = time.time()
    adapters = prepare_adapters([a for c in cases for a in CASES[c]])
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-server-adapters-"))
    env = served_env(root, tmp)
    package = served_package(env)
    port = free_port()
    argv = serve_argv(args, adapters, port)
    print(f"serving {package} ({git_commit(Path(package))}): {shlex.join(argv)}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill of this script still stops the server
    server = Server("loraplex", argv, port, tmp / "server.log", env=env, cwd=tmp)
    points: list[dict] = []
    try:
        ready_s = server.wait_ready_http(args.start_timeout)
        base_name = server.base_name()
        print(f"ready after {ready_s:.0f} s; base model {base_name!r}; log {server.log_path}", flush=True)
        for rnd in range(1, args.rounds + 1):
            for case in cases:
                label = f"round {rnd}/{args.rounds} {case}"
                point = dict(run_point(server, args, case, base_name, label), round=rnd)
                points.append(point)
                base = next((p for p in points if p["case"] == "base" and p["round"] == rnd), None)
                kept = f"  kept {point['tok_s'] / base['tok_s']:.3f}" if base and base["tok_s"] and case != "base" else ""
                print(f"{label}: {point['tok_s']:.1f} tok/s ({point['num_ok']} ok, {point['num_errors']} errors, "
                      f"other load {point['other_load_cores']:.2f} cores, client {point['client_cores']:.2f}){kept}", flush=True)  # fmt: skip
    finally:
        server.stop()
    rows = summarize_cases(points, cases, args.rounds)
    served_root = Path(package)
    meta = dict(
        command=command, server_command=shlex.join(argv), machine=machine_info(), served_checkout=str(served_root),
        served_commit=git_commit(served_root), bench_commit=git_commit(REPO), dtype=args.dtype,
        max_lora_rank=args.max_lora_rank, extra_args=args.extra_args, rounds=args.rounds, duration=args.duration,
        concurrency=args.concurrency, output_len=args.output_len, prompt_len=str(BenchConfig.prompt_len),
        warmup=args.warmup, base_model=base_name, date=time.strftime("%Y-%m-%d %H:%M"), minutes=(time.time() - t0) / 60,
        env={k: os.environ[k] for k in sorted(os.environ) if k.startswith(("LORAPLEX_", "OMP_", "MKL_"))},
    )  # fmt: skip
    print("\n" + markdown_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows, points=points), indent=2))
    print(f"wrote {out} ({meta['minutes']:.1f} min)")
    if args.write_results:
        write_results(meta, rows, args.label)


def write_results(meta: dict, rows: list[dict], label: str) -> None:
    key = "server-adapters" + ("" if meta["dtype"] == "bfloat16" else f"-{meta['dtype']}") + (f"-{label}" if label else "")
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    m = meta["machine"]
    extra = f", extra serve flags `{meta['extra_args']}`" if meta["extra_args"] else ""
    section = f"""{begin}
Run {meta["date"]} ({meta["minutes"]:.0f} min) on {m["cpu_name"]} ({m["cores"]} cores; {" ".join(m["cpu_flags"]) or "no AVX-512/AMX flags"}),
torch {m["torch"]}, served checkout {meta["served_commit"]}, {meta["dtype"]}, max-lora-rank {meta["max_lora_rank"] or "default"}{extra}.

    {meta["command"]}

One `loraplex serve` with every case's adapters; each point is closed loop: {meta["concurrency"]} streamed chats in
flight, {meta["output_len"]} greedy tokens each (ignore_eos), {meta["duration"]:g} s; "kept" = tok/s / base tok/s of the
same round, median over {meta["rounds"]} rounds.

{markdown_table(rows)}
{end}"""
    heading = f"Server throughput with adapters of different ranks and targets (issue 15){', ' + meta['dtype'] if meta['dtype'] != 'bfloat16' else ''}{', ' + label if label else ''}"
    write_results_section(section, begin, end, heading)


if __name__ == "__main__":
    main()
