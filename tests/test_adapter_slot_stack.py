"""The stacked slot layout (kernels.lora_slots.LoraSlotStack) and the host tier's per-module layout
(adapter_cache.peft_format.AdapterWeights): an adapter written from the host tier in a few large copies
equals the per-layer, per-module write exactly, a reused slot keeps nothing of its previous adapter, the
host copy holds the per-tensor cast and scale, bad files still fail with their typed errors, and the
engine still matches transformers + PEFT token for token while one slot is reused. CPU only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import live_slot_state, reference_greedy, save_peft_adapter, save_tiny_model

from loraplex.adapter_cache.peft_format import AdapterWeights, BaseShapes, load_peft_adapter
from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.engine.loader import load_hf_config, load_model
from loraplex.engine.model import CausalLM, ModelSpec, write_lora_slot
from loraplex.errors import AdapterFormatError, AdapterShapeError
from loraplex.kernels.lora_slots import LoraSlots, LoraSlotStack, row_tables
from loraplex.scheduler.sampling_params import SamplingParams

R_MAX = 16
KEY = "base_model.model.model.layers.{}.{}.{}.lora_{}.weight"


def _save_pattern_adapter(base: Path, out: Path, seed: int) -> Path:
    """A PEFT adapter with per-module ranks and alphas that targets layer 1 only (layer 0 untargeted)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"k_proj": 3},
        alpha_pattern={"down_proj": 5},
        layers_to_transform=[1],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama, adapters of different ranks, targets and layers, and the base's shapes."""
    root = tmp_path_factory.mktemp("stack")
    base = save_tiny_model(root / "base", "llama")
    adapters = {
        "all16": save_peft_adapter(base, root / "all16", 16, 32, "all-linear", False, seed=1),
        "qv4": save_peft_adapter(base, root / "qv4", 4, 8, ["q_proj", "v_proj"], False, seed=2),
        "ko1": save_peft_adapter(base, root / "ko1", 1, 2, ["o_proj"], False, seed=3),
        "mlp6rs": save_peft_adapter(base, root / "mlp6rs", 6, 12, ["gate_proj", "up_proj", "down_proj"], True, seed=4),
        "pattern": _save_pattern_adapter(base, root / "pattern", seed=5),
    }
    spec = ModelSpec.from_hf_config(load_hf_config(base))
    return root, base, adapters, BaseShapes(str(base), spec.num_layers, spec.lora_shapes())


def _model(base: Path, dtype: torch.dtype = torch.float32, num_slots: int = 3) -> CausalLM:
    model, _ = load_model(base, dtype, lora_slots=(num_slots, R_MAX))
    return model


def _slot_state(model: CausalLM) -> list[torch.Tensor]:
    """Every slot buffer of every linear (A and W via weight_ext, B, the row tables)."""
    out = []
    for lin in model.lora_linears():
        assert lin.slots is not None and lin.lora_at is not None and lin.lora_bt is not None
        out += [lin.slots.weight_ext, lin.slots.lora_b, lin.lora_at, *lin.lora_bt]
    return out


def _assert_same(a: CausalLM, b: CausalLM, what: str) -> None:
    for x, y in zip(_slot_state(a), _slot_state(b), strict=True):
        assert torch.equal(x, y), what


@pytest.mark.parametrize("with_rows", [False, True], ids=["transposing", "host-rows"])
@pytest.mark.parametrize("name", ["all16", "qv4", "ko1", "mlp6rs", "pattern"])
def test_host_tier_write_equals_per_module_write(world, name, with_rows):
    """write_lora_slot of the host tier's AdapterWeights (a few stacked copies; the row tables from the
    host's transposed copy, or by transposing copies) leaves exactly the buffers the per-layer,
    per-module LoraSlots.write leaves (a plain dict takes that path)."""
    _, base, adapters, shapes = world
    weights = load_peft_adapter(name, adapters[name], shapes, R_MAX, with_rows=with_rows).weights
    assert isinstance(weights, AdapterWeights) and (weights.rows is not None) == with_rows
    stacked, per_module = _model(base), _model(base)
    write_lora_slot(stacked, 1, weights)
    write_lora_slot(per_module, 1, dict(weights))
    _assert_same(stacked, per_module, name)
    # and it really landed: slot 1 of the targeted linears is not zero, the other slots are
    for layer, module in weights:
        lin, i = stacked.lora_linear(layer, module)
        assert lin.lora_a is not None and lin.lora_b is not None
        assert lin.lora_a[1, i].any() and not lin.lora_a[[0, 2]].any() and not lin.lora_b[[0, 2]].any()


def test_reused_slot_keeps_nothing_of_its_previous_adapter(world):
    """Any order of writes (higher then lower rank, fewer targets and layers, per-module writes between,
    clears) leaves a slot as writing its last adapter into a fresh model (A and the B row table exactly;
    lora_b and the A row table up to the slice ranks: above them a stacked write keeps the previous
    values, multiplied by the zeros of the other side); a clear zeroes everything; other slots are
    untouched."""
    _, base, adapters, shapes = world
    loaded = {n: load_peft_adapter(n, p, shapes, R_MAX, with_rows=n != "qv4").weights for n, p in adapters.items()}
    used = _model(base)
    write_lora_slot(used, 0, loaded["mlp6rs"])  # a neighbour that must survive everything below
    neighbour = [t.clone() for t in _slot_state(used)]
    sequence = ["all16", "pattern", "ko1", "all16", "qv4", "mlp6rs", "ko1"]
    kept_old = False
    for k, name in enumerate(sequence):
        # every other write of the sequence by the per-module path: the stacked path must still zero
        # what those left
        write_lora_slot(used, 1, loaded[name] if k % 2 == 0 else dict(loaded[name]))
        fresh = _model(base)
        write_lora_slot(fresh, 0, loaded["mlp6rs"])
        write_lora_slot(fresh, 1, loaded[name])
        for x, y in zip(live_slot_state(used), live_slot_state(fresh), strict=True):
            assert torch.equal(x, y), f"after {sequence[: k + 1]}"
        kept_old |= any(not torch.equal(x, y) for x, y in zip(_slot_state(used), _slot_state(fresh), strict=True))
    assert kept_old  # some stacked write above did leave values of an earlier adapter (not vacuous)
    write_lora_slot(used, 1, {})  # clear (unload)
    for got, want in zip(_slot_state(used), neighbour, strict=True):
        assert torch.equal(got, want)  # slot 1 zero again, slot 0 as written, W untouched


def test_layers_view_the_stack_with_the_usual_layouts(world):
    """Each layer's LoraSlots are views of the stack with the shapes and strides of standalone buffers,
    so the kernels read the same layouts; the row tables stay what row_tables builds from the slots."""
    _, base, adapters, shapes = world
    model = _model(base)
    write_lora_slot(model, 2, load_peft_adapter("all16", adapters["all16"], shapes, R_MAX).weights)
    for layer_idx, layer in enumerate(model.decoder_layers()):
        for group, lin in zip(("qkv", "o", "gate_up", "down"), layer.linears(), strict=True):
            slots, stack = lin.slots, model.lora_stacks[group]
            assert slots is not None and slots.rows is not None
            own = LoraSlots(slots.weight, None, slots.slice_offsets, 3, R_MAX, with_row_tables=True)
            assert slots.weight_ext.data_ptr() == stack.weight_ext[layer_idx].data_ptr()
            assert slots.lora_b.data_ptr() == stack.lora_b[layer_idx].data_ptr()
            for mine, theirs in [
                (slots.weight_ext, own.weight_ext),
                (slots.lora_a, own.lora_a),
                (slots.lora_b, own.lora_b),
                (slots.rows.a, own.rows.a),
                *zip(slots.rows.b, own.rows.b, strict=True),
            ]:
                assert mine.shape == theirs.shape and mine.stride() == theirs.stride()
            assert torch.equal(slots.weight, lin.weight)  # W lives in the stack too
            expected = row_tables(slots.lora_a, slots.lora_b, slots.slice_offsets)
            assert torch.equal(slots.rows.a, expected.a)
            assert all(torch.equal(x, y) for x, y in zip(slots.rows.b, expected.b, strict=True))


def test_stack_write_refuses_misfit_shapes():
    stack = LoraSlotStack(3, 8, [0, 4, 6], 2, 4, torch.float32, torch.device("cpu"), with_row_tables=True)
    a, b = torch.ones(3, 2, 8), torch.ones(3, 4, 2)
    stack.write(0, [(a, b), None])
    with pytest.raises(ValueError, match="do not fit"):  # one layer's A would broadcast over all three
        stack.write(0, [(a[:1], b), None])
    with pytest.raises(ValueError, match="do not fit"):
        stack.write(0, [None, (a, b)])  # B of the first slice's width into the second
    with pytest.raises(ValueError, match="r_max"):
        stack.write(0, [(torch.ones(3, 5, 8), torch.ones(3, 4, 5)), None])
    with pytest.raises(ValueError, match="do not fit"):  # row layouts not transposed
        stack.write(0, [(a, b), None], [(a, b), None])


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_host_copy_holds_the_per_tensor_cast_and_scale(world, tmp_path, file_dtype):
    """In bfloat16, A = a.to(bf16) and B = (b.float() * scale).to(bf16) per tensor (the old rounding),
    scale = alpha_pattern / rank_pattern per module; padding (lower ranks, untargeted layer 0) is zero."""
    _, _, adapters, shapes = world
    path = tmp_path / "pattern"
    path.mkdir()
    (path / "adapter_config.json").write_text((adapters["pattern"] / "adapter_config.json").read_text())
    raw = load_file(adapters["pattern"] / "adapter_model.safetensors")
    save_file({k: v.to(file_dtype).contiguous() for k, v in raw.items()}, path / "adapter_model.safetensors")
    raw = load_file(path / "adapter_model.safetensors")
    adapter = load_peft_adapter("p", path, shapes, R_MAX, torch.bfloat16)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert adapter.rank == 8 and adapter.target_modules == ["down_proj", "k_proj", "q_proj", "v_proj"]
    for module, group in [("q_proj", "self_attn"), ("k_proj", "self_attn"), ("down_proj", "mlp")]:
        r = cfg["rank_pattern"].get(module, cfg["r"])
        alpha = cfg["alpha_pattern"].get(module, cfg["lora_alpha"])
        a = raw[KEY.format(1, group, module, "A")]
        b = raw[KEY.format(1, group, module, "B")]
        a_all, b_all = adapter.weights.stacked[module]
        assert a_all.shape[1] == r and a_all.dtype == torch.bfloat16
        assert torch.equal(a_all[1], a.to(torch.bfloat16))
        assert torch.equal(b_all[1], (b.float() * (alpha / r)).to(torch.bfloat16))
        assert not a_all[0].any() and not b_all[0].any()  # layer 0 is not targeted
        assert (0, module) not in adapter.weights and torch.equal(adapter.weights[(1, module)][0], a_all[1])
    assert adapter.num_bytes == sum(t.numel() * 2 for ab in adapter.weights.stacked.values() for t in ab)
    with_rows = load_peft_adapter("p", path, shapes, R_MAX, torch.bfloat16, with_rows=True)
    assert with_rows.weights.rows is not None and with_rows.num_bytes == 2 * adapter.num_bytes
    for module, (a_all, b_all) in adapter.weights.stacked.items():
        a_t, b_t = with_rows.weights.rows[module]
        assert a_t.is_contiguous() and torch.equal(a_t, a_all.transpose(1, 2))
        assert b_t.is_contiguous() and torch.equal(b_t, b_all.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_copy_of_a_full_adapter_holds_the_per_tensor_cast_and_scale(
    world, tmp_path, file_dtype: torch.dtype, dtype: torch.dtype
):
    """An adapter of every layer at one rank goes in by one concatenation per buffer (and one multiply
    for B, or one per layer where alpha_pattern names a single layer): the values must be exactly the
    per-tensor a.to(dtype) / (b.float() * scale).to(dtype) all the same."""
    _, _, adapters, shapes = world
    path = tmp_path / "full"
    path.mkdir()
    cfg = json.loads((adapters["all16"] / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"model.layers.1.self_attn.q_proj": 7}  # q_proj: two scales over the layers
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    raw = load_file(adapters["all16"] / "adapter_model.safetensors")
    save_file({k: v.to(file_dtype).contiguous() for k, v in raw.items()}, path / "adapter_model.safetensors")
    raw = load_file(path / "adapter_model.safetensors")
    adapter = load_peft_adapter("full", path, shapes, R_MAX, dtype)
    r = cfg["r"]
    assert adapter.rank == r and len(adapter.weights) == shapes.num_layers * len(shapes.modules)
    for module, (a_all, b_all) in adapter.weights.stacked.items():
        group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        assert a_all.dtype == b_all.dtype == dtype and a_all.shape[1] == b_all.shape[2] == r
        for layer in range(shapes.num_layers):
            alpha = 7 if (layer, module) == (1, "q_proj") else cfg["lora_alpha"]
            a, b = raw[KEY.format(layer, group, module, "A")], raw[KEY.format(layer, group, module, "B")]
            assert torch.equal(a_all[layer], a.to(dtype)), (module, layer)
            assert torch.equal(b_all[layer], (b.float() * (alpha / r)).to(dtype)), (module, layer)
    stacked = adapter.weights.stacked.values()
    assert adapter.num_bytes == sum(t.numel() * t.element_size() for ab in stacked for t in ab)


def test_digest_is_sha256_of_the_config_and_the_weights_file(world, monkeypatch):
    """The digest (the prefix cache's namespace of the adapter's version) is fed piece by piece while the
    file is read; it must stay sha256 over (length, bytes) of adapter_config.json, then of the weights."""
    import hashlib

    from loraplex.adapter_cache import peft_format

    _, _, adapters, shapes = world
    path = adapters["mlp6rs"]
    want = hashlib.sha256()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        data = (path / file).read_bytes()
        want.update(len(data).to_bytes(8, "little"))
        want.update(data)
    for chunk in (1000, 1 << 20):  # many pieces (the last one short), and one
        monkeypatch.setattr(peft_format, "READ_CHUNK_BYTES", chunk)
        assert load_peft_adapter("d", path, shapes, R_MAX).digest == want.hexdigest()


def test_flat_views_equal_tensor_views(tmp_path):
    """flat_views (one split when the entries tile the data, else one view per entry) gives each
    entry's elements and shape as tensor_view does, and refuses what tensor_view refuses."""
    from loraplex.safetensors_view import flat_views, parse_header, tensor_view

    tensors = {"b": torch.randn(3, 4), "a": torch.randn(5), "e": torch.zeros(0, 2), "c": torch.randn(2, 2, 2)}
    cases = {
        "tiled": tensors,
        "mixed": {**tensors, "h": torch.randn(4, 2).to(torch.bfloat16), "i": torch.arange(3)},
    }
    for case, ts in cases.items():
        save_file(ts, tmp_path / f"{case}.safetensors")
        buf = bytearray((tmp_path / f"{case}.safetensors").read_bytes())
        header, start = parse_header(buf)
        views = flat_views(buf, header, start, len(buf))
        assert list(views) == list(header)
        for key, (flat, shape) in views.items():
            assert flat.dim() == 1 and shape == tuple(ts[key].shape), (case, key)
            assert torch.equal(flat.view(shape), tensor_view(buf, header[key], start, len(buf))), (case, key)
            assert torch.equal(flat.view(shape), ts[key]), (case, key)
    # a gap between entries (not tiled): views per entry, same values
    buf = bytearray((tmp_path / "tiled.safetensors").read_bytes())
    header, start = parse_header(buf)
    del header["b"]
    views = flat_views(buf, header, start, len(buf))
    assert torch.equal(views["a"][0], tensors["a"]) and torch.equal(views["c"][0].view(2, 2, 2), tensors["c"])
    for bad in ({"dtype": "F32", "data_offsets": [0, 4 * 5 + 4], "shape": [5]}, ["not", "a", "dict"]):
        with pytest.raises(ValueError):
            flat_views(buf, {**header, "x": bad}, start, len(buf))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _set(key: str, value: float):
    def edit(t: dict) -> None:
        t[key] = t[key].clone()
        t[key].view(-1)[3] = value

    return edit


@pytest.mark.parametrize(
    "case, exc, words",
    [
        ("inf_in_a", AdapterFormatError, ["layer 1 q_proj", "non-finite"]),
        ("nan_in_b", AdapterFormatError, ["layer 0 down_proj", "non-finite"]),
        ("overflows_bf16", AdapterFormatError, ["layer 1 v_proj", "non-finite"]),
        ("b_of_other_rank", AdapterShapeError, ["layer 0 o_proj", "do not fit"]),
        ("garbage", AdapterFormatError, ["cannot read adapter_model.safetensors"]),
        ("offsets_past_end", AdapterFormatError, ["cannot read adapter_model.safetensors"]),
    ],
)
def test_bad_adapters_fail_with_their_typed_error(world, tmp_path, case, exc, words):
    _, _, adapters, shapes = world
    src = adapters["all16"]
    path = tmp_path / case
    if case == "inf_in_a":
        _rewrite(src, path, _set(KEY.format(1, "self_attn", "q_proj", "A"), math.inf))
    elif case == "nan_in_b":
        _rewrite(src, path, _set(KEY.format(0, "mlp", "down_proj", "B"), math.nan))
    elif case == "overflows_bf16":  # finite in float32, infinite once scaled and cast to bfloat16
        _rewrite(src, path, _set(KEY.format(1, "self_attn", "v_proj", "B"), 3e38))
    elif case == "b_of_other_rank":
        key = KEY.format(0, "self_attn", "o_proj", "B")
        _rewrite(src, path, lambda t: t.__setitem__(key, t[key][:, :8].contiguous()))
    else:
        _rewrite(src, path, lambda t: None)
        f = path / "adapter_model.safetensors"
        data = bytearray(f.read_bytes())
        if case == "garbage":
            data[8:40] = b"\x00not json at all\xff" * 2
        else:  # the header promises more bytes than the file holds
            data = data[: len(data) - 64]
        f.write_bytes(bytes(data))
    with pytest.raises(exc) as info:
        load_peft_adapter(case, path, shapes, R_MAX, torch.bfloat16)
    assert info.value.adapter == case
    for w in words:
        assert w in str(info.value), str(info.value)


def test_engine_reusing_one_slot_matches_transformers_peft(world):
    """One device slot, adapters of falling rank and shrinking targets one after another (each evicts the
    previous from the slot): every result equals transformers + PEFT token for token."""
    _, base, adapters, _ = world
    engine = Engine(
        Config(
            model=str(base),
            adapters=tuple((n, str(p)) for n, p in adapters.items()),
            dtype="float32",
            max_lora_rank=R_MAX,
            max_active_adapters=1,
        )
    )
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 384, (11,), generator=g).tolist()
    for name in ["all16", "pattern", "mlp6rs", "qv4", "ko1", "all16", "qv4"]:
        result = engine.generate([prompt], [name], SamplingParams(max_tokens=8))[0]
        ref, margin = reference_greedy(base, adapters[name], prompt, 8)
        assert margin > 1e-3, f"{name}: near-tied reference logits; pick another seed"
        assert result.token_ids == ref, name
    engine.adapter_cache.close()


def test_host_copies_do_not_share_the_read_buffer(world):
    """Files are read into a buffer each thread reuses: a host copy read before another file must keep its
    values (nothing of it may be a view of that buffer), and equal the digest of a fresh read."""
    _, _, adapters, shapes = world
    first = load_peft_adapter("all16", adapters["all16"], shapes, R_MAX, torch.float32, with_rows=True)
    kept = {m: (a.clone(), b.clone()) for m, (a, b) in first.weights.stacked.items()}
    for name in ("qv4", "mlp6rs", "pattern"):  # overwrite the buffer with other files
        load_peft_adapter(name, adapters[name], shapes, R_MAX, torch.float32)
    for m, (a, b) in first.weights.stacked.items():
        assert torch.equal(a, kept[m][0]) and torch.equal(b, kept[m][1]), m
    again = load_peft_adapter("all16", adapters["all16"], shapes, R_MAX, torch.float32)
    assert again.digest == first.digest and len(first.digest) == 64
    other = load_peft_adapter("qv4", adapters["qv4"], shapes, R_MAX, torch.float32)
    assert other.digest != first.digest


def test_cache_loads_the_transposed_host_copy_with_the_adapter(world):
    """host_rows: the load itself makes the transposed layout (the host tier counts its bytes), so the
    first install is plain copies too; slot writes from it leave the buffers the per-module write does."""
    from loraplex.adapter_cache.cache import AdapterCache
    from loraplex.adapter_cache.sources import AdapterSources

    _, base, adapters, shapes = world
    model = _model(base, num_slots=2)
    plain = load_peft_adapter("pattern", adapters["pattern"], shapes, R_MAX).num_bytes
    cache = AdapterCache(
        AdapterSources(named={n: str(p) for n, p in adapters.items()}),
        shapes, R_MAX, torch.float32, 2, 4, 1 << 30,
        lambda s, w, r: write_lora_slot(model, s, w),
        lambda s: write_lora_slot(model, s, {}),
        host_rows=True,
    )  # fmt: skip
    try:
        cache.load("pattern", wait=30.0)
        assert cache.stats()["host"]["bytes"] == 2 * plain
        assert next(r for r in cache.list() if r["name"] == "pattern")["bytes"] == 2 * plain
        assert cache.install_ready() == ["pattern"]  # from the transposed host copy
        for name in ("qv4", "all16"):  # push it out of both slots (it stays on host), then back in
            cache.load(name, wait=30.0)
            cache.install_ready()
        assert cache.slot_of("pattern") is None
        cache.request_load("pattern")
        assert cache.install_ready() == ["pattern"]
        fresh = _model(base, num_slots=2)
        pattern = load_peft_adapter("pattern", adapters["pattern"], shapes, R_MAX).weights
        write_lora_slot(fresh, cache.slot_of("all16") or 0, dict(load_peft_adapter("all16", adapters["all16"], shapes, R_MAX).weights))
        write_lora_slot(fresh, cache.slot_of("pattern") or 0, dict(pattern))
        for x, y in zip(live_slot_state(model), live_slot_state(fresh), strict=True):
            assert torch.equal(x, y), "host_rows install"
        assert cache.unload("pattern") and cache.unload("all16") and cache.unload("qv4")
        assert cache.stats()["host"]["bytes"] == 0
    finally:
        cache.close()


def _resident_fraction(t: torch.Tensor) -> float:
    """Share of the pages under contiguous tensor `t` that are resident (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
    vec = (ctypes.c_ubyte * ((end - start) // page))()
    assert libc.mincore(start, end - start, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / len(vec)


def test_slot_pages_warms_the_next_fresh_slots_and_keeps_their_contents():
    """SlotPages faults in the pages of the next WARM_AHEAD never-written slots (lazily mapped buffers:
    untouched pages are not resident), slot 0 on from allocation and s + 1.. after a write into s,
    without changing what they hold."""
    from loraplex.engine.model import SlotPages, lazy_zeros, populate_pages

    if not populate_pages([torch.zeros(1)]):
        pytest.skip("the kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    num_slots, layers, in_f = 6, 2, 512
    stack = LoraSlotStack(layers, in_f, [0, 256, 512], num_slots, 64, torch.float32, torch.device("cpu"),
                          with_row_tables=True, zeros=lazy_zeros)  # fmt: skip
    stack.weight_ext[0, 512 + 128 + 5, 7] = 3.5  # slot 1 holds a value before it is warmed

    def warm(slot: int) -> bool:
        return all(_resident_fraction(c) == 1.0 for c in stack.slot_chunks(slot))

    assert not any(warm(s) for s in range(num_slots))  # fresh lazy pages (slot 1: only one page touched)
    pages = SlotPages({"x": stack}, num_slots)
    pages.written(-1)  # allocation
    if pages.thread is not None:
        pages.thread.join()
    assert [warm(s) for s in range(num_slots)] == [True, True, False, False, False, False]
    pages.written(0)
    if pages.thread is not None:
        pages.thread.join()
    assert [warm(s) for s in range(num_slots)] == [True, True, True, False, False, False]
    pages.written(4)  # slots further on: 5 only (no slot 6)
    if pages.thread is not None:
        pages.thread.join()
    assert [warm(s) for s in range(num_slots)] == [True, True, True, False, False, True]
    assert pages.warmed == {0, 1, 2, 5}
    assert stack.weight_ext[0, 512 + 128 + 5, 7] == 3.5
    assert stack.weight_ext[:, 512:].count_nonzero() == 1 and stack.rows is not None
    assert all(t.count_nonzero() == 0 for t in [*stack.rows.b, stack.rows.a])
