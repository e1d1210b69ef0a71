"""Start-up calibration of the CPU LoRA cost model: the per-machine CostFigures (cpu_plan.py) measured on
this machine, on the model's own LoRA linear shapes, in the model's dtype.

Why: which exact CPU strategy is cheapest (cpu_lora.py) turns on a handful of machine figures (what a
small matmul call costs, how fast large matmuls and copies run, what an embedding_bag call costs and
how fast it reads rows). Their ratios differ by several times between CPUs (AMX or not, AVX-512 bf16 or
emulated, core count, memory), so figures measured on one box pick wrong plans on another (slow, never
wrong: every strategy is exact). Nothing here is a built-in timing.

What is timed: one small function per CostFigures field (MEASURES), each over every distinct shape
(out_total, num_slices, r_max, in_features) of the model's LoRA linears:
    call_seconds_16bit / _32bit  CALL_TOKENS tokens through one adapter the way "grouped" / "stacked" run it: the
                                 shrink F.linear on the stacked A rows, then one addmm on the stacked B
                                 (per call; 16-bit: the model's dtype, bfloat16 for a float32 model)
    flops_per_second             a 32-token shrink over 4 slots' A rows (stacked / fused matmuls)
    copy_bytes_per_second        index_select of 4 of 8 slots' A and B (the stacked copy's build;
                                 read + write)
    row_call_seconds             per output slice, the rows strategy's index_select + embedding_bag +
                                 add over a single row (per call)
    row_bytes_per_second         embedding_bag of 8 tokens over the A row table (in_features rows each)
Each timing is the best (min) of a few short repeats after a warm-up call, so a busy machine does not
inflate it unless it is busy in every repeat; rates are work over time less the fixed call cost. A time
budget per measurement caps the repeats (BUDGET_SECONDS in all; ~0.1-0.3 s for small models). The
result must pass a plausibility check (SANE_RANGES: finite, positive, e.g. call costs 0.5 us..5 ms);
a failure re-measures once, a second one raises CalibrationError. Everything is measured in two
independent passes; the better value of each field is kept, and when the passes disagree by more than
STEADY_SPREAD (the machine was busy) the figures serve this run but are not cached.

Cache: <cache dir>/cpu_calibration.json = {"version": FORMAT_VERSION, "entries": {key: {"figures": ...}}},
the key naming the CPU model (/proc/cpuinfo, else platform), torch version, dtype,
torch.get_num_threads() and the shape set. A file of another version or unreadable JSON is ignored (and
rewritten); an entry whose fields are not CostFigures' or whose figures are implausible is ignored. A
cached entry is re-validated with one cheap re-timing (the model dtype's small-call cost): off by more
than REVALIDATE_FACTOR either way (measured under load, or the machine changed under the same name) ->
calibrate anew and overwrite. Writes are atomic (temp file + os.replace); an unwritable cache dir only
skips caching.

Without figures (Config.cpu_calibration "off", or calibration failing for any reason) the planner uses
no cost model at all: "grouped", exact for every step (cpu_plan.choose_plan).

The clock is injectable (`clock=`, or DEFAULT_CLOCK; tests drive it), and nothing else is: the measured
operations are the real kernels' operations on real tensors.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cpu_plan import (
    FUSE_MAX_ADAPTERS,
    CostFigures,
    LinearShape,
    choose_plan,
    delta_costs,
    fused_packed_cost,
    fused_single_cost,
)
from .meta import LoraMeta, build_lora_meta

Clock = Callable[[], float]  # seconds, monotonic (time.perf_counter)
DEFAULT_CLOCK: Clock = time.perf_counter  # what a call without clock= reads (tests may set another)

MODES = ("auto", "off")  # Config.cpu_calibration
FORMAT_VERSION = 3  # bump when the cache file's layout or a measurement's meaning changes
CACHE_FILE_NAME = "cpu_calibration.json"
MAX_CACHE_ENTRIES = 32  # most recently saved entries kept (models x dtypes x thread counts)
CALL_TOKENS = 4  # tokens of one adapter in the small-call measurement (a decode step's share of one adapter)
STEADY_SPREAD = 1.6  # two passes further apart than this (some field): measured on a busy machine, not cached
REVALIDATE_FACTOR = 2.5  # a cached figure re-timed off by more than this either way is re-measured
BUDGET_SECONDS = 0.8  # the whole calibration, split evenly over the measurements and shapes
REPEATS = 5  # timed repeats per measurement at most (fewer once its share of the budget is spent)
MIN_REPEATS = 2
# Streaming measurements (copies, row reads) rotate over copies of their data of about this many bytes in
# all, so repeats read from memory as the model's many layers do, not from a warm cache.
STREAM_BYTES = 16 * 2**20
# Broad bounds of a believable figure (not estimates of any machine): outside them a timing went wrong.
SANE_RANGES: dict[str, tuple[float, float]] = {
    "call_seconds_16bit": (0.5e-6, 5e-3),
    "call_seconds_32bit": (0.5e-6, 5e-3),
    "row_call_seconds": (0.5e-6, 5e-3),
    "flops_per_second": (1e7, 1e16),
    "copy_bytes_per_second": (1e6, 1e14),
    "row_bytes_per_second": (1e6, 1e14),
}
FIELDS = tuple(f.name for f in fields(CostFigures))


class CalibrationError(RuntimeError):
    """The figures could not be measured plausibly (the engine then runs without a cost model)."""


# ---- measuring ------------------------------------------------------------------------------------


def distinct_shapes(shapes: Sequence[LinearShape]) -> list[LinearShape]:
    """The distinct shapes, in a fixed order (the cache key and the measurement order)."""
    return sorted(set(shapes))


def _slices(shape: LinearShape) -> list[tuple[int, int]]:
    """Column ranges of the output slices; the cost model knows only their count, so equal widths."""
    out, n = shape.out_total, shape.num_slices
    bounds = [out * j // n for j in range(n + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


class Probe:
    """What the measurements share: the shapes and dtype, the clock, each measurement's time share, a
    seeded generator, and the figures measured so far (one measurement may build on another)."""

    def __init__(
        self, shapes: Sequence[LinearShape], dtype: torch.dtype, clock: Clock, budget_s: float, repeats: int
    ) -> None:
        self.shapes = distinct_shapes(shapes)
        self.dtype, self.clock, self.repeats = dtype, clock, repeats
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.run_budget_s = budget_s / (len(MEASURES) * max(1, len(self.shapes)))
        self.gen = torch.Generator().manual_seed(0)
        self.values: dict[str, float] = {}

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Uniform [-1, 1) data (not zeros: zeros can run faster than real weights)."""
        return torch.empty(shape, dtype=dtype or self.dtype).uniform_(-1, 1, generator=self.gen)

    def copies(self, first: torch.Tensor) -> list[torch.Tensor]:
        """`first` and enough clones of it (other addresses) that STREAM_BYTES of them, at most one per
        call of best_seconds, do not all fit in a cache."""
        n = min(self.repeats + 1, max(1, -(-STREAM_BYTES // (first.numel() * first.element_size()))))
        return [first] + [first.clone() for _ in range(n - 1)]

    def best_seconds(self, fn: Callable[[], object]) -> float:
        """Min seconds of fn over up to `repeats` timed calls after one warm-up call (oneDNN builds its
        primitives, pages fault in); stops early once MIN_REPEATS ran and the time share is spent."""
        fn()
        best, spent = math.inf, 0.0
        for i in range(self.repeats):
            t0 = self.clock()
            fn()
            dt = self.clock() - t0
            best, spent = min(best, dt), spent + dt
            if i + 1 >= MIN_REPEATS and spent > self.run_budget_s:
                break
        return best

    def figure(self, name: str) -> float:
        """The named CostFigures field, measured once (MEASURES[name])."""
        if name not in self.values:
            if name not in MEASURES:
                raise CalibrationError(f"no measurement for CostFigures field {name!r}")
            self.values[name] = float(MEASURES[name](self))
        return self.values[name]


def call_field(dtype: torch.dtype) -> str:
    """The small-call figure the model's dtype uses (CostFigures.call_seconds)."""
    return "call_seconds_16bit" if torch.empty((), dtype=dtype).element_size() == 2 else "call_seconds_32bit"


def _one_token_pair(p: Probe, s: LinearShape, dtype: torch.dtype) -> Callable[[], None]:
    """CALL_TOKENS tokens through one adapter as "grouped" / "stacked" run it: h = x A^T on the stacked A rows
    [num_slices * r_max, in], then y += h B on the stacked (block-diagonal) B [num_slices * r_max, out]."""
    k = s.num_slices * s.r_max
    x = p.rand(CALL_TOKENS, s.in_features, dtype=dtype)
    a = p.rand(k, s.in_features, dtype=dtype)
    bt = p.rand(k, s.out_total, dtype=dtype)
    y = torch.zeros(CALL_TOKENS, s.out_total, dtype=dtype)

    def run() -> None:
        y.addmm_(F.linear(x, a), bt)

    return run


def _small_call_seconds(p: Probe, dtype: torch.dtype) -> float:
    """Seconds per call of _one_token_pair (2 calls), mean over the shapes."""
    per_call = [p.best_seconds(_one_token_pair(p, s, dtype)) / 2 for s in p.shapes]
    return sum(per_call) / len(per_call)


def measure_call_seconds_16bit(p: Probe) -> float:
    return _small_call_seconds(p, p.dtype if p.elem == 2 else torch.bfloat16)


def measure_call_seconds_32bit(p: Probe) -> float:
    return _small_call_seconds(p, torch.float32)


def _rotating(op: Callable[[torch.Tensor], object], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """A call of op on the next of `inputs` in turn (streaming measurements: each call reads cold data)."""
    turn = [0]

    def run() -> object:
        turn[0] += 1
        return op(inputs[turn[0] % len(inputs)])

    return run


def measure_flops_per_second(p: Probe) -> float:
    """Multiply-adds x2 per second of a 32-token shrink over 4 slots' A rows, less the call cost."""
    tokens, slots = 32, 4
    call = p.figure(call_field(p.dtype))
    flops = seconds = 0.0
    for s in p.shapes:
        x = p.rand(tokens, s.in_features)
        a = p.rand(slots * s.num_slices * s.r_max, s.in_features)
        t = p.best_seconds(_rotating(partial(F.linear, x), [a]))
        flops += 2 * tokens * a.shape[0] * s.in_features
        seconds += max(t - call, t / 2)
    return flops / seconds


def measure_copy_bytes_per_second(p: Probe) -> float:
    """Bytes read + written per second of index_select over 4 of 8 slots' A and B (the stacked copy's build)."""
    slots, picked = 8, torch.tensor([0, 2, 4, 6])
    copied = seconds = 0.0
    for s in p.shapes:
        per_slot = s.r_max * (s.num_slices * s.in_features + s.out_total)
        srcs = p.copies(p.rand(slots, per_slot))
        seconds += p.best_seconds(_rotating(lambda src: src.index_select(0, picked), srcs))
        copied += 2 * len(picked) * per_slot * p.elem
    return copied / seconds


def _one_row_per_slice(p: Probe, s: LinearShape) -> Callable[[], None]:
    """The rows strategy's per-slice index_select + embedding_bag + add, each over a single row."""
    idx, off = torch.tensor([0]), torch.tensor([0])
    cols = _slices(s)
    tables = [p.rand(2 * s.r_max, c1 - c0) for c0, c1 in cols]
    h = p.rand(s.num_slices * s.r_max)
    h_idx = [torch.tensor([j * s.r_max]) for j in range(len(cols))]
    y = torch.zeros(1, s.out_total, dtype=p.dtype)

    def run() -> None:
        for j, (c0, c1) in enumerate(cols):
            w = h.index_select(0, h_idx[j])
            y[:, c0:c1] += F.embedding_bag(idx, tables[j], off, mode="sum", per_sample_weights=w)

    return run


def measure_row_call_seconds(p: Probe) -> float:
    """Seconds per call of _one_row_per_slice (3 * num_slices calls), mean over the shapes."""
    per_call = [p.best_seconds(_one_row_per_slice(p, s)) / (3 * s.num_slices) for s in p.shapes]
    return sum(per_call) / len(per_call)


def measure_row_bytes_per_second(p: Probe) -> float:
    """Row bytes per second embedding_bag reads: 8 tokens of 4 slots, in_features rows of the A table
    [slots * in, num_slices * r_max] each (the rows strategy's shrink), less the call cost."""
    tokens, slots = 8, 4
    call = p.figure("row_call_seconds")
    read = seconds = 0.0
    for s in p.shapes:
        in_f = s.in_features
        tables = p.copies(p.rand(slots * in_f, s.num_slices * s.r_max))
        a_idx = ((torch.arange(tokens) % slots)[:, None] * in_f + torch.arange(in_f)).view(-1)
        a_off = torch.arange(tokens) * in_f
        xw = p.rand(tokens * in_f)

        def bag(table: torch.Tensor, a_idx=a_idx, a_off=a_off, xw=xw) -> torch.Tensor:
            return F.embedding_bag(a_idx, table, a_off, mode="sum", per_sample_weights=xw)

        t = p.best_seconds(_rotating(bag, tables))
        read += tokens * in_f * s.num_slices * s.r_max * p.elem
        seconds += max(t - call, t / 2)
    return read / seconds


# CostFigures field -> its measurement. A field added to CostFigures needs an entry here.
MEASURES: dict[str, Callable[[Probe], float]] = {
    "call_seconds_16bit": measure_call_seconds_16bit,
    "call_seconds_32bit": measure_call_seconds_32bit,
    "flops_per_second": measure_flops_per_second,
    "copy_bytes_per_second": measure_copy_bytes_per_second,
    "row_call_seconds": measure_row_call_seconds,
    "row_bytes_per_second": measure_row_bytes_per_second,
}


def implausible(values: dict[str, Any]) -> str:
    """Why these values are no believable CostFigures ("" when they are): a field missing or extra, not
    a finite positive number, or outside SANE_RANGES."""
    if set(values) != set(FIELDS):
        return f"fields {sorted(values)} are not CostFigures' {sorted(FIELDS)}"
    for name in FIELDS:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            return f"{name}={v!r} is not a finite positive number"
        lo, hi = SANE_RANGES.get(name, (0.0, math.inf))
        if not lo <= v <= hi:
            return f"{name}={v:.3g} is outside [{lo:.3g}, {hi:.3g}]"
    return ""


def _one_pass(shapes: Sequence[LinearShape], dtype: torch.dtype, clock: Clock, budget_s: float, repeats: int) -> dict[str, float]:
    """Every field measured once; an implausible result is re-measured once, a second one raises."""
    problem = ""
    for _ in range(2):
        probe = Probe(shapes, dtype, clock, budget_s, repeats)
        with torch.inference_mode():
            values = {name: probe.figure(name) for name in FIELDS}
        problem = implausible(values)
        if not problem:
            return values
    raise CalibrationError(f"implausible figures, twice: {problem}")


def measure_twice(
    shapes: Sequence[LinearShape],
    dtype: torch.dtype,
    *,
    clock: Clock | None = None,
    budget_s: float = BUDGET_SECONDS,
    repeats: int = REPEATS,
) -> tuple[CostFigures, float]:
    """(figures, spread): two independent passes (half the budget each), the better of the two per field
    (the smaller time, the larger rate), and the largest ratio between the passes' values of a field. A
    machine busy during one pass shows as a spread well above 1: such figures serve this run but are
    not cached (STEADY_SPREAD)."""
    if not shapes:
        raise CalibrationError("no LoRA linear shapes to measure")
    clock = clock or DEFAULT_CLOCK
    first = _one_pass(shapes, dtype, clock, budget_s / 2, repeats)
    second = _one_pass(shapes, dtype, clock, budget_s / 2, repeats)
    best = {n: (max if n.endswith("_per_second") else min)(first[n], second[n]) for n in FIELDS}
    spread = max(max(first[n], second[n]) / min(first[n], second[n]) for n in FIELDS)
    return CostFigures(**best), spread


def calibrate(
    shapes: Sequence[LinearShape],
    dtype: torch.dtype,
    *,
    clock: Clock | None = None,
    budget_s: float = BUDGET_SECONDS,
    repeats: int = REPEATS,
) -> CostFigures:
    """Measure every CostFigures field on these shapes in this dtype (see the module docstring): the
    better of two passes; an implausible pass is re-measured once, a second one raises CalibrationError."""
    return measure_twice(shapes, dtype, clock=clock, budget_s=budget_s, repeats=repeats)[0]


# ---- the cache file ------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo 'model name'; else what platform reports)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_key(shapes: Sequence[LinearShape], dtype: torch.dtype) -> dict[str, Any]:
    """What figures depend on: the CPU, torch, the dtype, the thread count and the shape set."""
    return {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "shapes": [[s.out_total, s.num_slices, s.r_max, s.in_features] for s in distinct_shapes(shapes)],
    }


def key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def read_cache(path: Path) -> dict[str, dict]:
    """The file's entries; {} when it is missing, unreadable, not JSON or of another version."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}


def cached_figures(entries: dict[str, dict], key: dict[str, Any]) -> CostFigures | None:
    """The entry for `key` as CostFigures; None when absent or not exactly CostFigures' plausible fields."""
    entry = entries.get(key_text(key))
    values = entry.get("figures") if entry is not None else None
    if not isinstance(values, dict) or implausible(values):
        return None
    return CostFigures(**{name: float(values[name]) for name in FIELDS})


def write_cache(path: Path, entries: dict[str, dict]) -> bool:
    """Write the entries (the MAX_CACHE_ENTRIES most recently saved) atomically; False where the cache
    dir cannot be written (caching is skipped, nothing fails)."""
    newest = sorted(entries.items(), key=lambda kv: kv[1].get("saved", 0), reverse=True)[:MAX_CACHE_ENTRIES]
    text = json.dumps({"version": FORMAT_VERSION, "entries": dict(newest)}, indent=1, sort_keys=True)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


# ---- start-up ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The figures the planner gets (None: no cost model, "grouped") and how they were obtained."""

    figures: CostFigures | None
    how: str

    def describe(self) -> str:
        """One log line: the figures and where they come from, or the fallback and why."""
        if self.figures is None:
            return f"no cost figures ({self.how}): every step uses the 'grouped' strategy"
        return f"{format_figures(self.figures)} ({self.how})"


def format_figures(fig: CostFigures) -> str:
    """`name=value` per field: seconds in us, rates in G/s."""
    parts = []
    for name in FIELDS:
        v = getattr(fig, name)
        parts.append(f"{name}={v / 1e9:.2f}G" if name.endswith("_per_second") else f"{name}={v * 1e6:.2f}us")
    return ", ".join(parts)


def startup_figures(
    mode: str,
    shapes: Sequence[LinearShape],
    dtype: torch.dtype,
    cache_file: Path | None,
    *,
    clock: Clock | None = None,
    budget_s: float = BUDGET_SECONDS,
) -> Calibration:
    """The engine's figures at start: "off" -> none, nothing timed; "auto" -> the cached entry for this
    machine and model when a re-timing confirms it, else freshly measured (and cached; cache_file None:
    neither read nor written). Never raises for a measurement problem: any failure -> no figures."""
    if mode not in MODES:
        raise ValueError(f"cpu calibration must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return Calibration(None, "cpu calibration off")
    clock = clock or DEFAULT_CLOCK
    try:
        return _auto(shapes, dtype, cache_file, clock, budget_s)
    except Exception as exc:  # any failure leaves the engine serving, with the safe default
        return Calibration(None, f"calibration failed: {type(exc).__name__}: {exc}")


def _auto(
    shapes: Sequence[LinearShape], dtype: torch.dtype, cache_file: Path | None, clock: Clock, budget_s: float
) -> Calibration:
    key = cache_key(shapes, dtype)
    entries = read_cache(cache_file) if cache_file is not None else {}
    cached = cached_figures(entries, key)
    why = "measured"
    if cached is not None:
        name = call_field(dtype)
        with torch.inference_mode():
            now = Probe(shapes, dtype, clock, budget_s, repeats=3).figure(name)
        ratio = now / getattr(cached, name)
        if 1 / REVALIDATE_FACTOR <= ratio <= REVALIDATE_FACTOR:
            return Calibration(cached, f"cached in {cache_file}, re-timed {name} {ratio:.2f}x of it")
        why = f"re-measured: the cached {name} was {ratio:.2f}x off"
    t0 = clock()
    figures, spread = measure_twice(shapes, dtype, clock=clock, budget_s=budget_s)
    why += f" in {clock() - t0:.2f} s"
    if spread > STEADY_SPREAD:  # the machine was busy: serve with them, measure again at the next start
        return Calibration(figures, why + f", not cached (the two passes differ up to {spread:.1f}x: a busy machine)")
    if cache_file is not None:
        entries[key_text(key)] = {"figures": {n: getattr(figures, n) for n in FIELDS}, "saved": time.time()}
        why += f", cached in {cache_file}" if write_cache(cache_file, entries) else ", not cached (cache dir not writable)"
    return Calibration(figures, why)


# ---- the plans the figures choose (`loraplex calibrate`) -----------------------------------------

# (kind, tokens, distinct adapters): decodes spread tokens round-robin, prefills give each adapter a run,
# mixed steps are a prompt chunk of adapter 0 next to 15 decode tokens of the others.
REPRESENTATIVE_STEPS = [
    ("decode", 1, 1),
    ("decode", 16, 1),
    ("decode", 16, 8),
    ("decode", 32, 1),
    ("decode", 32, 8),
    ("decode", 32, 32),
    ("prefill", 64, 1),
    ("prefill", 64, 4),
    ("prefill", 512, 1),
    ("prefill", 512, 4),
    ("mixed", 64, 7),
    ("mixed", 256, 7),
]
PLAN_COLUMNS = ("grouped", "stacked", "split", "rows", "fused-single", "fused-packed", "merged")
TABLE_RANK = 16  # the adapters of the table: this rank (at most r_max) on every slice


def step_meta(kind: str, tokens: int, adapters: int, r_max: int) -> LoraMeta:
    """A step's LoraMeta: every token with an adapter (slots 0..adapters-1, all of rank r_max)."""
    if kind == "decode":
        token_slot = [t % adapters for t in range(tokens)]
    elif kind == "mixed":
        token_slot = [0] * (tokens - 15) + [1 + t % (adapters - 1) for t in range(15)]
    else:
        token_slot = [t * adapters // tokens for t in range(tokens)]
    meta = build_lora_meta(token_slot, [r_max] * adapters)
    assert meta is not None
    return meta


def plan_estimates(
    fig: CostFigures,
    shape: LinearShape,
    kind: str,
    tokens: int,
    adapters: int,
    has_rows: bool,
    can_fuse: bool,
    merge: bool = True,
) -> tuple[str, dict[str, float]]:
    """(the plan choose_plan picks, estimated seconds of each plan that applies) for one step of adapters
    of rank TABLE_RANK on every slice; decodes with their stacked copy (and, packed W, their fused packed
    copy, or with one adapter and `merge` (Config.cpu_lora_merge) its merged copy) made already (steady
    decode), prefills without."""
    meta = step_meta(kind, tokens, adapters, shape.r_max)
    ks = (shape.num_slices * min(TABLE_RANK, shape.r_max),) * adapters
    cached = kind == "decode"
    fused = cached and not can_fuse and adapters <= FUSE_MAX_ADAPTERS  # W packed (fused-single: unpacked W)
    costs: dict[str, float] = {k: v for k, v in delta_costs(shape, meta, ks, cached, has_rows, fig).items()}
    if can_fuse and meta.is_single_full:
        costs["fused-single"] = fused_single_cost(tokens, shape, meta, fig)
    if fused:
        costs["fused-packed"] = fused_packed_cost(tokens, shape, meta, ks, fig)
    plan = choose_plan(tokens, shape, meta, ks, cached, has_rows, can_fuse, fig, fused_packed=fused)
    if fused and merge and adapters == 1 and meta.is_single_full:  # lora_linear_cpu serves it from the merged copy
        costs["merged"] = 0.0
        plan = "merged"
    return plan, costs


def plan_table(fig: CostFigures, linears: Sequence[tuple[LinearShape, bool, bool]], merge: bool = True) -> str:
    """A table of the plan chosen per linear (shape, has_rows, can_fuse) and representative step, with
    the estimated us of each plan (LoRA work beyond the base matmul; '-' where a plan does not apply)."""
    head = "| linear (out x slices, r_max, in) | step | plan | " + " | ".join(f"{c} us" for c in PLAN_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for shape, has_rows, can_fuse in linears:
        name = f"{shape.out_total} x {shape.num_slices}, {shape.r_max}, {shape.in_features}"
        for kind, tokens, adapters in REPRESENTATIVE_STEPS:
            plan, costs = plan_estimates(fig, shape, kind, tokens, adapters, has_rows, can_fuse, merge)
            cells = " | ".join(f"{costs[c] * 1e6:.1f}" if c in costs else "-" for c in PLAN_COLUMNS)
            lines.append(f"| {name} | {kind} {tokens} tok, {adapters} adapter(s) | {plan} | {cells} |")
    return "\n".join(lines)
