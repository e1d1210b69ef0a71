"""The CPU cost model's start-up calibration (kernels/cpu_calibrate.py): figures from an injected clock
(noisy, tied, implausible), the cache file's versioning, keys and re-validation, the safe default
without figures, and an engine that still serves when calibration fails or is off. Timings here come
from fake clocks: speed is measured in benchmarks, not asserted in tests."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import MISSING, fields, replace
from pathlib import Path

import pytest
import torch

from loraplex.kernels import LoraSlots, build_lora_meta
from loraplex.kernels import cpu_calibrate as cc
from loraplex.kernels.cpu_calibrate import (
    FORMAT_VERSION,
    CalibrationError,
    cache_key,
    calibrate,
    key_text,
    plan_estimates,
    startup_figures,
)
from loraplex.kernels.cpu_lora import active_here, lora_linear_cpu
from loraplex.kernels.cpu_plan import FUSE_MAX_ADAPTERS, CostFigures, LinearShape, choose_plan, delta_costs
from loraplex.kernels.reference import lora_delta_loop

# Tiny float32 shapes: q|k|v-like (3 slices), o-like, gate|up-like (2 slices).
SHAPES = [LinearShape(24, 3, 4, 16, 4), LinearShape(16, 1, 4, 16, 4), LinearShape(40, 2, 4, 16, 4)]
DTYPE = torch.float32


class FakeClock:
    """A clock whose every reading advances by one step: each timed call of the calibration lasts one
    step. jitter: each step drawn log-uniformly within [step / jitter, step * jitter]. switch_at: after
    this many readings the step becomes `then` (a machine whose load changes)."""

    def __init__(self, step: float = 50e-6, jitter: float = 1.0, seed: int = 0, switch_at: int = -1, then: float = 0.0):
        self.step, self.jitter, self.switch_at, self.then = step, jitter, switch_at, then
        self.rng = random.Random(seed)
        self.now, self.calls = 1000.0, 0

    def __call__(self) -> float:
        step = self.then if 0 <= self.switch_at <= self.calls else self.step
        self.calls += 1
        if self.jitter > 1:
            step *= math.exp(self.rng.uniform(-math.log(self.jitter), math.log(self.jitter)))
        self.now += step
        return self.now


def _valid_plans(meta, has_rows: bool, can_fuse: bool, fused_packed: bool = False, merged: bool = False) -> set[str]:
    """The plans that apply to this step (cpu_plan: grouped and stacked always; split with several
    adapters; rows needs row tables; fused-single one slot over the whole step, W unpacked; fused-packed
    the fused packed copy of the step's active set made; merged its merged copy)."""
    valid = {"grouped", "stacked"}
    if fused_packed:
        valid.add("fused-packed")
    if merged:
        valid.add("merged")
    if meta.num_active > 1:
        valid.add("split")
    if has_rows:
        valid.add("rows")
    if can_fuse and meta.is_single_full:
        valid.add("fused-single")
    return valid


# Step kinds over 6 slots: decode-like (a token per adapter), prefill of one adapter, of a few, with
# base-only tokens, and slots far apart.
STEPS = {
    "single-token": [2],
    "decode-spread": [0, 3, 5, 1, 4, 2, 0, 5],
    "prefill-one": [4] * 40,
    "prefill-two": [1] * 20 + [2] * 30,
    "with-base": [-1, 3, -1, 3, 0, -1],
    "far-apart": [0, 5, 0, 5, 5],
}


def _slots_and_oracle(shape: LinearShape, num_slots: int = 6, seed: int = 0):
    """LoraSlots (float64, row tables) of random adapters of mixed ranks over `shape`, with the weights."""
    g = torch.Generator().manual_seed(seed)
    width = shape.out_total // shape.num_slices
    offsets = [width * j for j in range(shape.num_slices)] + [shape.out_total]
    w = torch.randn(shape.out_total, shape.in_features, generator=g, dtype=torch.float64)
    slots = LoraSlots(w, None, offsets, num_slots, shape.r_max, with_row_tables=True)
    ranks = [1 + s % shape.r_max for s in range(num_slots)]
    for s, r in enumerate(ranks):
        per_slice = [
            (torch.randn(r, shape.in_features, generator=g, dtype=torch.float64),
             torch.randn(offsets[i + 1] - offsets[i], r, generator=g, dtype=torch.float64))
            for i in range(shape.num_slices)
        ]  # fmt: skip
        slots.write(s, per_slice)
    return slots, w, offsets, ranks


def _check_every_step(figures: CostFigures | None, can_fuse: bool = True) -> set[str]:
    """Every step kind on every shape: the plan chosen under `figures` applies to the step, and
    lora_linear_cpu by it equals the float64 per-token loop. Returns the plans seen."""
    seen = set()
    for shape in SHAPES:
        slots, w, offsets, ranks = _slots_and_oracle(shape)
        slots.figures = figures
        for token_slot in STEPS.values():
            meta = build_lora_meta(token_slot, ranks)
            x = torch.randn(len(token_slot), shape.in_features, dtype=torch.float64)
            ks = active_here(meta, slots.slice_ranks, shape.num_slices, shape.r_max).ks(meta)
            plan = choose_plan(len(token_slot), shape._replace(elem=8), meta, ks, False, True, can_fuse, figures)
            assert plan in _valid_plans(meta, True, can_fuse), (token_slot, plan)
            seen.add(plan)
            if can_fuse:  # W unpacked, as here: lora_linear_cpu's own choice is the same plan
                assert choose_plan(len(token_slot), shape._replace(elem=8), meta, ks, False, True, True, slots.figures) == plan
            y = lora_linear_cpu(x, slots.weight, None, None, slots, meta, plan=plan)
            want = x @ w.T + lora_delta_loop(x, slots.lora_a, slots.lora_b, offsets, token_slot).delta
            torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    return seen


def test_every_cost_figure_has_a_measurement_and_a_sane_range():
    names = {f.name for f in fields(CostFigures)}
    assert set(cc.MEASURES) == names and set(cc.SANE_RANGES) == names
    assert all(f.default is MISSING and f.default_factory is MISSING for f in fields(CostFigures))  # none built in


def test_noisy_timings_pick_a_valid_exact_plan_for_every_step():
    """Timings jittered by up to 30x either way (a busy machine, or a strange one) give all kinds of
    figures; whatever they are, every step gets a plan that applies to it and computes the exact sum."""
    seen: set[str] = set()
    for seed in range(6):
        clock = FakeClock(step=100e-6, jitter=30.0, seed=seed)
        figures = calibrate(SHAPES, DTYPE, clock=clock)
        assert cc.implausible({f: getattr(figures, f) for f in cc.FIELDS}) == ""
        seen |= _check_every_step(figures, can_fuse=seed % 2 == 0)
    assert len(seen) >= 3, seen  # the noise really moved the choice around


def test_constant_timings_and_exact_ties_pick_a_valid_plan():
    """Every timed call equally long, and figures under which two plans cost exactly the same (powers
    of two, so the sums are exact): the choice is still an applicable plan, deterministically."""
    _check_every_step(calibrate(SHAPES, DTYPE, clock=FakeClock(step=40e-6)))
    # 1 token, 1 adapter covering the step: grouped and stacked are the same 2 calls and multiply-adds
    shape = LinearShape(out_total=8, num_slices=1, r_max=2, in_features=4, elem=4)
    tie = CostFigures(
        call_seconds_16bit=2.0**-14, call_seconds_32bit=2.0**-14, flops_per_second=2.0**30,
        copy_bytes_per_second=2.0**30, row_call_seconds=2.0**-10, row_bytes_per_second=2.0**20,
    )  # fmt: skip
    meta = build_lora_meta([0], [2])
    costs = delta_costs(shape, meta, (2,), True, True, tie)
    assert costs["grouped"] == costs["stacked"] < costs["rows"]
    plans = {choose_plan(1, shape, build_lora_meta([0], [2]), (2,), True, True, False, tie) for _ in range(3)}
    assert len(plans) == 1 and plans <= {"grouped", "stacked"}


def test_implausible_figures_are_measured_again_then_given_up():
    """Every call 10 s long: a call cost above 5 ms is no believable figure. Implausible once, the
    calibration measures again; twice, it raises (the engine then runs without figures)."""
    clean = FakeClock(step=40e-6)
    calibrate(SHAPES, DTYPE, clock=clean)
    loaded = FakeClock(step=10.0)
    with pytest.raises(CalibrationError, match="call_seconds"):
        calibrate(SHAPES, DTYPE, clock=loaded)
    loaded_pass = loaded.calls // 2  # two passes (the time budget cuts the repeats of slow ones short)
    recovering = FakeClock(step=10.0, switch_at=loaded_pass, then=40e-6)  # the load goes after one pass
    figures = calibrate(SHAPES, DTYPE, clock=recovering)
    assert recovering.calls == loaded_pass + clean.calls
    want = calibrate(SHAPES, DTYPE, clock=FakeClock(step=40e-6))
    assert {f: getattr(figures, f) for f in cc.FIELDS} == pytest.approx({f: getattr(want, f) for f in cc.FIELDS})
    result = startup_figures("auto", SHAPES, DTYPE, None, clock=FakeClock(step=10.0))
    assert result.figures is None and "implausible" in result.how


def test_calibration_raising_falls_back_to_grouped():
    def broken() -> float:
        raise RuntimeError("no clock here")

    result = startup_figures("auto", SHAPES, DTYPE, None, clock=broken)
    assert result.figures is None and "RuntimeError: no clock here" in result.how
    assert "grouped" in result.describe()
    assert _check_every_step(result.figures) == {"grouped"}  # no figures: the safe default, exact


def test_off_times_nothing(tmp_path):
    clock = FakeClock()
    result = startup_figures("off", SHAPES, DTYPE, tmp_path / "cal.json", clock=clock)
    assert result.figures is None and clock.calls == 0 and not (tmp_path / "cal.json").exists()
    with pytest.raises(ValueError, match="auto, off"):
        startup_figures("sometimes", SHAPES, DTYPE, None, clock=clock)


def _entries(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["version"] == FORMAT_VERSION
    return data["entries"]


def _first_run(path: Path):
    clock = FakeClock(step=40e-6)
    result = startup_figures("auto", SHAPES, DTYPE, path, clock=clock)
    assert result.figures is not None and result.how.startswith("measured")
    return result.figures, clock.calls


def test_cache_round_trip_and_revalidation(tmp_path):
    path = tmp_path / "cache" / cc.CACHE_FILE_NAME  # the dir does not exist yet
    figures, full_calls = _first_run(path)
    entry = _entries(path)[key_text(cache_key(SHAPES, DTYPE))]
    assert entry["figures"] == {f: getattr(figures, f) for f in cc.FIELDS}

    again = FakeClock(step=40e-6)  # same machine, same load: the cached entry holds after one re-timing
    result = startup_figures("auto", SHAPES, DTYPE, path, clock=again)
    assert result.figures == figures and result.how.startswith("cached") and 0 < again.calls < full_calls / 3

    slower = FakeClock(step=40e-6 * 2.0)  # within 2.5x: still cached
    assert startup_figures("auto", SHAPES, DTYPE, path, clock=slower).figures == figures

    for factor in (3.0, 1 / 3.0):  # off by more than 2.5x either way: measured anew and overwritten
        clock = FakeClock(step=40e-6 * factor)
        result = startup_figures("auto", SHAPES, DTYPE, path, clock=clock)
        assert result.how.startswith("re-measured") and clock.calls > full_calls
        assert result.figures is not None and result.figures != figures
        stored = _entries(path)[key_text(cache_key(SHAPES, DTYPE))]["figures"]
        assert stored == {f: getattr(result.figures, f) for f in cc.FIELDS}


@pytest.mark.parametrize(
    "spoil",
    ["other-version", "other-torch", "other-cpu", "other-threads", "corrupt-json", "wrong-fields", "not-a-number"],
)
def test_cache_entries_that_do_not_fit_are_ignored_and_rewritten(tmp_path, spoil):
    """A cached entry that looks right but was written by another format version, torch, CPU or
    thread count, or a file that is not JSON, or an entry with other fields: measured anew (the clock
    runs a full calibration) and the file rewritten in the current format with this key's entry."""
    path = tmp_path / cc.CACHE_FILE_NAME
    figures, full_calls = _first_run(path)
    data = json.loads(path.read_text())
    key = cache_key(SHAPES, DTYPE)
    entry = data["entries"].pop(key_text(key))
    entry["figures"] = {f: v * 1.5 for f, v in entry["figures"].items()}  # distinguishable, in range
    if spoil == "other-version":
        data["version"] = FORMAT_VERSION + 1
        data["entries"][key_text(key)] = entry
    elif spoil in ("other-torch", "other-cpu", "other-threads"):
        field = {"other-torch": "torch", "other-cpu": "cpu", "other-threads": "threads"}[spoil]
        data["entries"][key_text({**key, field: key[field] * 2 if field == "threads" else "x" + key[field]})] = entry
    elif spoil == "wrong-fields":
        entry["figures"] = {**entry["figures"], "call_seconds_8bit": 1e-5}
        data["entries"][key_text(key)] = entry
    elif spoil == "not-a-number":
        entry["figures"]["flops_per_second"] = "fast"
        data["entries"][key_text(key)] = entry
    text = "{not json" if spoil == "corrupt-json" else json.dumps(data)
    path.write_text(text)

    clock = FakeClock(step=40e-6)
    result = startup_figures("auto", SHAPES, DTYPE, path, clock=clock)
    assert result.how.startswith("measured") and clock.calls >= full_calls
    assert result.figures == figures
    assert _entries(path)[key_text(key)]["figures"] == {f: getattr(figures, f) for f in cc.FIELDS}


def test_unwritable_cache_dir_only_skips_caching(tmp_path):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / cc.CACHE_FILE_NAME  # its parent is a file: no dir can be made there
    result = startup_figures("auto", SHAPES, DTYPE, path, clock=FakeClock())
    assert result.figures is not None and "not cached" in result.how
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # no temp file left behind


def test_plan_table_costs_every_applicable_plan():
    figures = calibrate(SHAPES, DTYPE, clock=FakeClock(step=40e-6, jitter=5.0, seed=3))
    for kind, tokens, adapters in cc.REPRESENTATIVE_STEPS:
        meta = cc.step_meta(kind, tokens, adapters, 4)
        assert meta.num_tokens == tokens and meta.num_active == adapters
        for has_rows, can_fuse, merge in ((True, True, True), (False, False, True), (False, False, False)):
            plan, costs = plan_estimates(figures, SHAPES[0], kind, tokens, adapters, has_rows, can_fuse, merge)
            # split is costed only where some adapters are worth a pair of their own and some are not
            # the table's steady decode on packed W, for sets fused-packed serves (as lora_linear_cpu does);
            # one adapter over the whole decode: its merged copy (no LoRA work) when merging is on
            fused = kind == "decode" and not can_fuse and adapters <= FUSE_MAX_ADAPTERS
            merged = fused and merge and adapters == 1
            valid = _valid_plans(meta, has_rows, can_fuse, fused, merged)
            assert set(costs) - {"split"} == valid - {"split"} and plan in costs and set(costs) <= valid
            assert costs[plan] == min(costs.values()) and (plan == "merged") == merged
    table = cc.plan_table(figures, [(s, True, True) for s in SHAPES])
    assert len(table.splitlines()) == 2 + len(SHAPES) * len(cc.REPRESENTATIVE_STEPS)


# ---- the engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from server_fixtures import make_world

    return make_world(tmp_path_factory.mktemp("calibration"), 2)


def _engine(world, tmp_path, mode: str):
    from loraplex.config import Config
    from loraplex.engine.engine import Engine

    base, adapters = world
    return Engine(
        Config(model=str(base), adapter_dir=str(adapters), dtype="float32", max_lora_rank=16, device="cpu",
               max_active_adapters=2, cpu_calibration=mode, cache_dir=str(tmp_path))
    )  # fmt: skip


def _serve(engine) -> list[list[int]]:
    from loraplex.scheduler.sampling_params import SamplingParams

    prompts, which = [[5, 6, 7, 8], [9, 10, 11], [12, 13]], [None, "a0", "a1"]
    results = engine.generate(prompts, which, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [len(r.token_ids) for r in results] == [6, 6, 6]
    return [r.token_ids for r in results]


def test_engine_calibrates_at_start_and_caches(world, tmp_path, monkeypatch, caplog):
    clock = FakeClock(step=40e-6)
    monkeypatch.setattr(cc, "DEFAULT_CLOCK", clock)
    with caplog.at_level(logging.INFO, logger="loraplex.engine.offload"):
        engine = _engine(world, tmp_path, "auto")
    figures = engine.device_model.calibration.figures
    assert figures is not None and clock.calls > 0
    assert all(lin.slots.figures is figures for lin in engine.model.lora_linears())
    shapes = engine.model.lora_shapes()
    assert len(shapes) == 4  # q|k|v, o, gate|up, down of the tiny llama
    assert key_text(cache_key(shapes, torch.float32)) in _entries(tmp_path / cc.CACHE_FILE_NAME)
    assert any("CPU LoRA planner: call_seconds_16bit=" in r.getMessage() for r in caplog.records)
    _serve(engine)
    engine.offload("host")
    calls = clock.calls
    _serve(engine)  # woken up: the figures come back with the rebuilt model, nothing is timed again
    assert clock.calls == calls and all(lin.slots.figures is figures for lin in engine.model.lora_linears())


def test_engine_serves_without_figures_when_calibration_fails_or_is_off(world, tmp_path, monkeypatch, caplog):
    """A failing measurement leaves the engine on the safe default (grouped), serving the same tokens
    as with calibration off; off times nothing at all."""
    timed = []
    for name, measure in list(cc.MEASURES.items()):
        monkeypatch.setitem(cc.MEASURES, name, lambda p, m=measure, n=name: timed.append(n) or m(p))
    off = _engine(world, tmp_path, "off")
    assert timed == [] and off.device_model.calibration.figures is None
    assert all(lin.slots.figures is None for lin in off.model.lora_linears())
    assert not (tmp_path / cc.CACHE_FILE_NAME).exists()

    def broken(p):
        raise RuntimeError("embedding_bag is not available")

    monkeypatch.setitem(cc.MEASURES, "row_bytes_per_second", broken)
    monkeypatch.setattr(cc, "DEFAULT_CLOCK", FakeClock(step=40e-6))  # the other figures plausible on any machine
    with caplog.at_level(logging.INFO, logger="loraplex.engine.offload"):
        failed = _engine(world, tmp_path, "auto")
    assert failed.device_model.calibration.figures is None
    assert all(lin.slots.figures is None for lin in failed.model.lora_linears())
    assert any("embedding_bag is not available" in r.getMessage() and "grouped" in r.getMessage() for r in caplog.records)
    assert _serve(failed) == _serve(off)


def test_a_failed_start_calibration_is_measured_again_when_the_engine_is_idle(world, tmp_path, monkeypatch):
    """Figures that failed at start (e.g. a machine too busy to time believably) are measured again by the
    stepping thread while no request waits (AsyncEngine's idle loop), a limited number of times, spaced
    out; once measured, the model's linears get them; with calibration off nothing is retried."""
    from loraplex.engine import offload
    from loraplex.engine.async_engine import AsyncEngine

    def broken(p):
        raise RuntimeError("busy machine")

    real = cc.MEASURES["row_bytes_per_second"]
    monkeypatch.setitem(cc.MEASURES, "row_bytes_per_second", broken)
    monkeypatch.setattr(cc, "DEFAULT_CLOCK", FakeClock(step=40e-6))  # plausible figures on any machine
    engine = _engine(world, tmp_path, "auto")
    dm = engine.device_model
    assert dm.calibration.figures is None and dm.calibration_tries == 1
    assert not engine.when_idle()  # too soon after the last try
    monkeypatch.setitem(cc.MEASURES, "row_bytes_per_second", real)  # the machine calmed down
    monkeypatch.setattr(offload, "CALIBRATION_RETRY_SECONDS", 0.0)
    aengine = AsyncEngine(engine)
    aengine.start()  # its idle loop retries
    try:
        for _ in range(200):
            if dm.calibration.figures is not None:
                break
            time.sleep(0.02)
    finally:
        aengine.stop()
    figures = dm.calibration.figures
    assert figures is not None and dm.calibration_tries == 2
    assert all(lin.slots.figures is figures for lin in engine.model.lora_linears())
    assert not engine.when_idle()  # measured: nothing more to do
    monkeypatch.setitem(cc.MEASURES, "row_bytes_per_second", broken)
    failing = _engine(world, tmp_path / "b", "auto")
    for _ in range(offload.CALIBRATION_RETRIES + 3):
        failing.when_idle()
    assert failing.device_model.calibration_tries == 1 + offload.CALIBRATION_RETRIES  # start, then the retries
    off = _engine(world, tmp_path / "c", "off")
    assert not off.when_idle() and off.device_model.calibration_tries == 1


def test_calibrate_command_prints_figures_and_plans(world, tmp_path, monkeypatch, capsys):
    from loraplex.cli import main

    monkeypatch.setattr(cc, "DEFAULT_CLOCK", FakeClock(step=40e-6))
    base, _ = world
    argv = ["calibrate", "--model", str(base), "--dtype", "float32", "--cache-dir", str(tmp_path), "--max-lora-rank", "8"]
    assert main([*argv, "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "call_seconds_32bit=" in out and "decode 32 tok, 8 adapter(s)" in out
    assert out.count("prefill 512 tok, 4 adapter(s)") == 4  # one row per distinct linear shape
    assert not (tmp_path / cc.CACHE_FILE_NAME).exists()  # --no-cache touches no file
    assert main(argv) == 0 and (tmp_path / cc.CACHE_FILE_NAME).exists()
    assert "cached in" in capsys.readouterr().out


def test_cost_figures_replace_keeps_them_hashable():
    """Figures key the per-step plan cache (LoraMeta.cache): they must hash, and differ when they do."""
    a = calibrate(SHAPES, DTYPE, clock=FakeClock())
    assert hash(a) == hash(replace(a)) and a != replace(a, flops_per_second=a.flops_per_second * 2)


def test_figures_of_a_busy_pass_serve_but_are_not_cached(tmp_path):
    """The machine gets 4x slower halfway (after the first of the two passes): the figures still serve
    this run (the better pass's), but they are not cached; on a steady machine they are."""
    counter = FakeClock(step=40e-6)
    cc._one_pass(SHAPES, DTYPE, counter, cc.BUDGET_SECONDS / 2, cc.REPEATS)
    path = tmp_path / cc.CACHE_FILE_NAME
    busy = FakeClock(step=40e-6, switch_at=counter.calls, then=160e-6)
    figures, spread = cc.measure_twice(SHAPES, DTYPE, clock=FakeClock(step=40e-6, switch_at=counter.calls, then=160e-6))
    assert spread > cc.STEADY_SPREAD
    result = startup_figures("auto", SHAPES, DTYPE, path, clock=busy)
    assert result.figures == figures and "not cached" in result.how and not path.exists()
    steady = startup_figures("auto", SHAPES, DTYPE, path, clock=FakeClock(step=40e-6))
    assert steady.figures is not None and path.exists()
