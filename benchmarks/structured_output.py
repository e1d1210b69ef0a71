"""Structured outputs: decode throughput at batch 32 over 8 adapters with every request constrained by a
realistic extraction schema, against the same requests unconstrained, in one run; and the compile time
of that schema (first time, cached). Prints a table, writes JSON.

    python benchmarks/structured_output.py [--dtype bfloat16] [--batch 32] [--adapters 8] [--repeats 3]
        [--new-tokens 48] [--temperature 0] [--out FILE.json] [--write-results]

Decode tok/s is the batch size over the median time of the pure decode steps with the whole batch still
running (one token per sequence), timed by the engine's step log, so a constrained request that finishes
early (its JSON is complete) does not shrink the batch being compared. Rounds interleave the two modes; "kept" is
the median over rounds of constrained / unconstrained tok/s of the same round.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import cpu_name, write_results_section  # noqa: E402

from loraplex.config import Config  # noqa: E402
from loraplex.engine.demo_adapters import ALL_LINEAR_MODULES, DemoAdapterSpec, write_lora_adapter  # noqa: E402
from loraplex.engine.engine import Engine  # noqa: E402
from loraplex.engine.loader import base_shapes_of, resolve_model_dir  # noqa: E402
from loraplex.scheduler.sampling_params import SamplingParams  # noqa: E402
from loraplex.scheduler.structured_output import StructuredOutput  # noqa: E402

# What an extraction fine-tune is asked for: a contact / lead record out of free text.
SCHEMA = {
    "type": "object",
    "properties": {
        "full_name": {"type": "string", "minLength": 1, "maxLength": 80},
        "email": {"type": "string", "format": "email"},
        "phone": {"type": "string", "pattern": "^\\+?[0-9 ()-]{7,20}$"},
        "company": {"type": "string", "maxLength": 80},
        "job_title": {"type": "string", "maxLength": 60},
        "seniority": {"enum": ["junior", "mid", "senior", "lead", "executive"]},
        "age": {"type": "integer", "minimum": 16, "maximum": 100},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "country_code": {"type": "string", "pattern": "^[A-Z]{2}$"},
            },
            "required": ["city", "country_code"],
        },
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 5},
        "interested": {"type": "boolean"},
        "budget_eur": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}]},
    },
    "required": ["full_name", "email", "company", "seniority", "address", "skills", "interested"],
}
PROMPT = (
    "Extract the contact as JSON. Text: Hi, I'm Jane Doe (34), CTO at Acme Robotics in Berlin, Germany. "
    "Reach me at jane.doe@acme-robotics.de or +49 30 1234567. We work with Python, Rust and ROS and "
    "have about 20k EUR for a pilot. Happy to hear more!"
)
BEGIN, END = "<!-- structured-output:begin -->", "<!-- structured-output:end -->"


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def decode_steps(engine: Engine, prompt: list[int], adapters: list[str | None], params: SamplingParams) -> list[float]:
    """Seconds of each pure decode step at full batch (one token for each of the len(adapters) rows)."""
    engine.step_log = []
    engine.generate([prompt] * len(adapters), adapters, params)
    full = [sec for n, seqs, sec in engine.step_log if n == seqs == len(adapters)]
    engine.step_log = None
    return full


class MaskTimer:
    """Times the grammar work of each step (fill the matchers' bitmasks, mask the logits)."""

    def __init__(self, engine: Engine) -> None:
        self.seconds: list[float] = []
        inner = engine.grammars.apply_masks

        def timed(logits, states) -> None:
            t0 = time.perf_counter()
            inner(logits, states)
            if any(s is not None for s in states):
                self.seconds.append(time.perf_counter() - t0)

        engine.grammars.apply_masks = timed  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out", default="benchmarks/out/structured_output.json")
    ap.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    ap.add_argument("--compile-only", action="store_true", help="only the compile times")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model_dir(None)
    shapes = base_shapes_of(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-structured-"))
    adapters = []
    for i in range(args.adapters):
        spec = DemoAdapterSpec(f"bench{i}", r=args.rank, lora_alpha=2 * args.rank, target_modules=ALL_LINEAR_MODULES, seed=i, b_std=0.002)
        adapters.append((spec.name, str(write_lora_adapter(tmp / spec.name, spec, shapes, str(model_dir)))))
    engine = Engine(
        Config(
            adapters=tuple(adapters), dtype=args.dtype, max_lora_rank=args.rank,
            max_active_adapters=max(args.adapters, 1), max_num_seqs=args.batch,
        )
    )
    prompt = engine.chat_prompt([{"role": "user", "content": PROMPT}])
    names = [adapters[i % len(adapters)][0] for i in range(args.batch)] if adapters else [None] * args.batch

    # compile: the first JSON request of a process also imports xgrammar, reads the tokenizer's
    # vocabulary and builds the JSON token filter; a plain json_object request takes that cost first
    structured = StructuredOutput.json_schema(SCHEMA, "response_format")
    cache = engine.grammars
    t0 = time.perf_counter()
    cache.compile(StructuredOutput.json_object("warm-up"))
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache.compile(structured)
    first_s = time.perf_counter() - t0
    cached = []
    for _ in range(100):
        t0 = time.perf_counter()
        cache.compile(structured)
        cached.append(time.perf_counter() - t0)
    cached_s = median(cached)
    print(f"compile: setup {setup_s * 1e3:.0f} ms, schema first {first_s * 1e3:.1f} ms, cached {cached_s * 1e6:.1f} us")
    if args.compile_only:
        return

    free = SamplingParams(max_tokens=1 + args.new_tokens, ignore_eos=True, temperature=args.temperature, seed=1)
    constrained = SamplingParams(max_tokens=1 + args.new_tokens, temperature=args.temperature, seed=1, structured=structured)
    masks = MaskTimer(engine)
    for params in (free, constrained):  # warm-up
        engine.generate([prompt] * args.batch, names, SamplingParams(max_tokens=3, ignore_eos=True, structured=params.structured))
    # tok/s of a round = batch / its median step (a few steps stall for other processes on a shared
    # machine; those stalls are not ours); "pooled" = batch / the median of all the mode's steps
    rates: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    steps: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    for _ in range(args.repeats):
        for mode, params in (("unconstrained", free), ("constrained", constrained)):
            seconds = decode_steps(engine, prompt, names, params)
            rates[mode].append(args.batch / median(seconds))
            steps[mode].extend(seconds)
            print(f"{mode:14s} {rates[mode][-1]:8.1f} tok/s (median of {len(seconds)} full-batch decode steps)", flush=True)
    kept = median([c / u for c, u in zip(rates["constrained"], rates["unconstrained"], strict=True)])
    pooled = {mode: args.batch / median(seconds) for mode, seconds in steps.items()}
    kept_pooled = pooled["constrained"] / pooled["unconstrained"]
    mask_ms = median(masks.seconds) * 1e3
    step_ms = median(steps["constrained"]) * 1e3
    sample = engine.generate([prompt], [names[0]], SamplingParams(max_tokens=400, temperature=args.temperature, seed=1, structured=structured))[0]

    rows = [
        ("unconstrained", median(rates["unconstrained"]), pooled["unconstrained"], 1.0, 1.0),
        ("every request constrained", median(rates["constrained"]), pooled["constrained"], kept, kept_pooled),
    ]
    table = [
        f"    python benchmarks/structured_output.py --dtype {args.dtype} --batch {args.batch} --adapters {args.adapters} "
        f"--new-tokens {args.new_tokens} --repeats {args.repeats} --temperature {args.temperature:g}",
        "",
        f"Decode at batch {args.batch} over {args.adapters} adapters (rank {args.rank}, all-linear), SmolLM2-135M "
        f"{args.dtype}, {cpu_name()}, {torch.get_num_threads()} threads; the extraction schema of the script "
        f"({len(SCHEMA['properties'])} properties: nested object, pattern, format, enum, bounds, anyOf, array):",
        "",
        "| requests | decode tok/s (median round) | tok/s (all steps pooled) | kept: median of round ratios | kept: pooled |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {tps:.1f} | {tp:.1f} | {k:.3f}x | {kp:.3f}x |" for name, tps, tp, k, kp in rows],
        "",
        f"Grammar work per constrained step (fill {args.batch} bitmasks, mask the logits): median "
        f"{mask_ms:.2f} ms of a {step_ms:.0f} ms step.",
        "",
        f"Compile of that schema: **{first_s * 1e3:.1f} ms** the first time, **{cached_s * 1e6:.1f} us** cached "
        f"(median of 100 hits); the first structured request of a process also pays {setup_s * 1e3:.0f} ms to "
        "import xgrammar, read the tokenizer's vocabulary and build the JSON token filter.",
        "",
        f"A sample output ({sample.finish_reason}, {len(sample.token_ids)} tokens): `{sample.text}`",
    ]
    section = "\n".join([BEGIN, *table, END])
    print("\n".join(table))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=platform.processor() or platform.machine(), cpu=cpu_name(), cpus=torch.get_num_threads(),
                torch=torch.__version__, dtype=args.dtype, batch=args.batch, adapters=args.adapters, rank=args.rank,
                new_tokens=args.new_tokens, temperature=args.temperature, prompt_tokens=len(prompt))
    out.write_text(json.dumps(dict(
        meta=meta, rates=rates, step_seconds=steps, kept=kept, kept_pooled=kept_pooled, mask_ms_median=mask_ms,
        compile_seconds=dict(setup=setup_s, first=first_s, cached=cached_s), sample=sample.text,
    ), indent=2))
    print(f"wrote {out}")
    if args.write_results:
        write_results_section(section, BEGIN, END, "Structured outputs (issue 16)")


if __name__ == "__main__":
    main()
