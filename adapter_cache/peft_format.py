"""Read and validate a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

Adapters are data, never code: safetensors only, every field and tensor checked against the base model.
The result holds, per target module, A [num_layers, r, in] and B [num_layers, out, r] of all layers (the
PEFT scale folded into B, cast to the serving dtype): the host-tier copy, laid out so that writing it into
a device slot is a few large copies (kernels.lora_slots.LoraSlotStack.write).

Cost: the file is read once, in pieces that a digest thread hashes while the rest is read; its bytes
are then viewed in place (the header is parsed once; shapes are validated from it, before any tensor
op). Each module kind's layers are concatenated straight into the host layout (one op per buffer, one
multiply for B's scale), all modules' buffers share one allocation, and one finite check runs over it:
about 25 torch ops per adapter instead of two per tensor, whatever the layer count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import mmap
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterFormatError, AdapterShapeError, UnsupportedAdapterError
from ..safetensors_view import flat_views, parse_header
from .host_memory import MAP_FLAGS, POOLED, HostMemory

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# base_model.model.model.layers.3.self_attn.q_proj.lora_A[.default].weight
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.[\w-]+)?\.weight$"
)


@functools.lru_cache(maxsize=4096)  # adapters of one base share their few hundred tensor names
def _parse_key(key: str) -> tuple[int, str, str] | None:
    """(layer, module, "A" or "B") of a PEFT LoRA tensor name, else None."""
    m = _KEY.match(key)
    return None if m is None else (int(m.group(1)), m.group(2), m.group(3))


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must fit: target module -> (in_features, out_features), and the layer count."""

    name: str  # base model name or path, for the base_model_name_or_path check
    num_layers: int
    modules: dict[str, tuple[int, int]]


class AdapterWeights(Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]):
    """An adapter's weights, per target module for all layers at once (the host-tier copy):
        stacked[module] = (A [num_layers, r_m, in], B [num_layers, out, r_m] scaled)
    r_m is the module's largest rank over the layers; a lower rank and a layer the adapter does not
    target are zero there. Optionally (for slots with CPU row tables) the same values transposed:
        rows[module] = (A^T [num_layers, in, r_m], B^T [num_layers, r_m, out])   contiguous
    so that the row tables are filled by plain copies too (memory: twice the host copy).
    As a mapping: (layer, module) -> (A [r, in], B [out, r] scaled), views of the stacked buffers, for
    the (layer, module) pairs the adapter targets (r: that pair's rank)."""

    def __init__(
        self,
        stacked: dict[str, tuple[torch.Tensor, torch.Tensor]],
        ranks: dict[tuple[int, str], int],
        num_layers: int,
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.stacked, self.ranks, self.num_layers, self.rows = stacked, ranks, num_layers, rows

    def __getitem__(self, key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.ranks[key]
        a, b = self.stacked[key[1]]
        return a[key[0], :r], b[key[0], :, :r]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)

    @property
    def num_bytes(self) -> int:
        buffers = [*self.stacked.values(), *(self.rows or {}).values()]
        return sum(t.numel() * t.element_size() for ab in buffers for t in ab)


@dataclass
class LoraAdapter:
    name: str
    path: Path
    rank: int  # largest rank over its modules
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    # per module, all layers (see AdapterWeights); also (layer, module) -> (A [r, in], B [out, r] scaled)
    weights: AdapterWeights = field(repr=False)
    base_model_name_or_path: str | None = None
    # sha256 of adapter_config.json + the safetensors bytes: the prefix cache's namespace tells versions apart
    digest: str = ""

    @property
    def num_bytes(self) -> int:
        return self.weights.num_bytes


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path by regex suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_key):
            return value
    return default


def read_adapter_config(name: str, path: Path) -> dict:
    if not path.is_dir():
        raise AdapterFormatError(name, f"adapter directory {path} does not exist", code="adapter_not_found")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterFormatError(name, f"missing {CONFIG_FILE} in {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(name, f"cannot parse {CONFIG_FILE}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterFormatError(name, f"{CONFIG_FILE} is not a JSON object")
    return cfg


def _check_config(name: str, cfg: dict, base: BaseShapes, max_rank: int) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(name, f"peft_type {peft_type!r} is not supported (only LORA)", param="peft_type")
    if cfg.get("use_dora"):
        raise UnsupportedAdapterError(name, "DoRA adapters (use_dora=true) are not supported", param="use_dora")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedAdapterError(name, f"bias={cfg.get('bias')!r} is not supported (only 'none')", param="bias")
    if cfg.get("modules_to_save"):
        raise UnsupportedAdapterError(
            name, f"modules_to_save={cfg['modules_to_save']!r} is not supported", param="modules_to_save"
        )
    for flag in ("use_qalora", "lora_bias"):
        if cfg.get(flag):
            raise UnsupportedAdapterError(name, f"{flag}=true is not supported", param=flag)
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(name, f"r must be a positive integer, got {r!r}", param="r")
    ranks = [r, *cfg.get("rank_pattern", {}).values()]
    if max(ranks) > max_rank:
        raise AdapterShapeError(
            name, f"rank {max(ranks)} is above the configured maximum --max-lora-rank {max_rank}", param="r"
        )
    if not isinstance(cfg.get("lora_alpha", 8), int | float):
        raise AdapterFormatError(name, "lora_alpha must be a number", param="lora_alpha")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            leaf = str(t).rsplit(".", 1)[-1]
            if leaf not in base.modules:
                raise UnsupportedAdapterError(
                    name,
                    f"target module {t!r} is not supported (supported: {sorted(base.modules)})",
                    param="target_modules",
                )
    elif targets is not None and not isinstance(targets, str):
        raise AdapterFormatError(name, "target_modules must be a list or a string", param="target_modules")
    expected = cfg.get("base_model_name_or_path")
    if expected and base.name and Path(str(expected)).name != Path(base.name).name:
        log.warning("adapter %r was trained on %r; serving it on %r", name, expected, base.name)


# Each loader thread reads files into one reused buffer (up to this size): a fresh buffer would cost a
# page fault per 4 KiB page on every load, about as much as the rest of the parse.
SCRATCH_MAX_BYTES = 64 * 2**20
_scratch = threading.local()


def _read_buffer(size: int) -> memoryview:
    """A writable buffer of `size` bytes: a view of this thread's scratch buffer when small enough (valid
    until this thread's next call), else a new one."""
    if size > SCRATCH_MAX_BYTES:
        return memoryview(bytearray(size))
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < size:
        buf = _scratch.buf = bytearray(size)
    return memoryview(buf)[:size]


# tensor name -> (its elements, a 1-D view of the file's bytes; its shape)
FlatTensors = dict[str, tuple[torch.Tensor, tuple[int, ...]]]
# The file is read in pieces of this size, each handed to the digest thread as soon as it is in.
READ_CHUNK_BYTES = 2**20


class _Digest:
    """sha256 over (length, bytes) of each part, computed by a thread (hashlib releases the GIL on large
    data) from pieces fed as they are read: it runs alongside the read and the host copy and is done
    about when they are, instead of adding its time after the read. result() waits for it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pieces: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="adapter-digest", daemon=True)
        self._thread.start()
        self._hex: str | None = None

    def _run(self) -> None:
        while (data := self._pieces.get()) is not None:
            self._hash.update(data)

    def part(self, size: int) -> None:
        """A part of `size` bytes starts; its bytes follow by feed()."""
        self._pieces.put(size.to_bytes(8, "little"))

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes of the current part; nothing may write them until result() returned."""
        self._pieces.put(data)

    def result(self) -> str:
        """Ends the feed, waits for the thread; the hex digest."""
        if self._hex is None:
            self._pieces.put(None)
            self._thread.join()
            self._hex = self._hash.hexdigest()
        return self._hex


def _read_tensors(name: str, weights_path: Path, digest: _Digest) -> tuple[memoryview, FlatTensors]:
    """The file's bytes, read once (into _read_buffer: use them before this thread reads the next file)
    and fed to `digest` piece by piece, and tensor name -> (a 1-D view of them, shape)."""
    try:
        with weights_path.open("rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = _read_buffer(size)  # writable: torch.frombuffer views it without a copy
            digest.part(size)
            done = 0
            while done < size:
                n = f.readinto(buf[done : done + READ_CHUNK_BYTES])
                if not n:
                    raise OSError("the file changed while it was read")
                digest.feed(buf[done : done + n])
                done += n
        header, data_start = parse_header(buf)
        return buf, flat_views(buf, header, data_start, size)
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(name, f"cannot read {WEIGHTS_FILE}: {exc}") from exc


def _scales(cfg: dict) -> Callable[[int, str, int], float]:
    """(layer, module, rank) -> the PEFT scale: lora_alpha (or its alpha_pattern value for that module
    path) / r, or / sqrt(r) with use_rslora."""
    default = float(cfg.get("lora_alpha", 8))
    patterns = cfg.get("alpha_pattern", {})
    rslora = cfg.get("use_rslora", False)

    def scale(layer: int, module: str, r: int) -> float:
        alpha = default
        if patterns:
            group = "mlp" if module.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            alpha = float(_pattern_value(patterns, f"model.layers.{layer}.{group}.{module}", default))
        return alpha / math.sqrt(r) if rslora else alpha / r

    return scale


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: its min and max are finite (min/max propagate NaN). One pass, nothing
    allocated, many times faster than isfinite(t).all() on CPU."""
    lo, hi = torch.aminmax(t)
    return bool(lo.isfinite()) and bool(hi.isfinite())


def _stack_module(
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor, int, float]],
    a_all: torch.Tensor,  # [num_layers, r_m, in]
    b_all: torch.Tensor,  # [num_layers, out, r_m]
    full: bool,
) -> None:
    """Fill one module's host copy from its layers' (A, B as 1-D views of A [r, in] and B [out, r], r,
    scale): A and B * scale, cast to the buffers' dtype. Unless `full` (every layer at rank r_m), the
    buffers must be zero: padding stays so. The rounding is the per-tensor a.to(dtype) / (b.float() *
    scale).to(dtype): same dtype or float32 in, B is computed in float32 (opmath) and rounded once;
    other dtypes go through float32 first.

    The usual adapter (every layer, one rank, one dtype) takes one concatenation per buffer, straight
    into the host layout, and one multiply for the scale of all layers, instead of two ops per layer:
    a module kind's layers lie at scattered offsets of the file, and a few hundred small torch ops were
    most of a load's time."""
    num_layers, out_f, _ = b_all.shape
    in_f, dtype = a_all.shape[2], a_all.dtype
    file_dtypes = {t.dtype for a, b, _, _ in pairs.values() for t in (a, b)}
    if full and len(file_dtypes) == 1:
        layers = [pairs[layer] for layer in range(num_layers)]
        scales = [scale for _, _, _, scale in layers]
        torch.cat([a for a, _, _, _ in layers], out=a_all.view(-1))  # casts like copy_
        (file_dtype,) = file_dtypes
        # B in the file's dtype (same as dtype: in place) or float32 (other dtypes go through it)
        b_in = b_all if file_dtype == dtype else torch.empty(b_all.shape, dtype=file_dtype)
        torch.cat([b for _, b, _, _ in layers], out=b_in.view(-1))
        if b_in.dtype not in (dtype, torch.float32):
            b_in = b_in.float()
        if all(scale == scales[0] for scale in scales):
            torch.mul(b_in, scales[0], out=b_all)
        else:  # alpha_pattern names single layers
            for layer, scale in enumerate(scales):
                torch.mul(b_in[layer], scale, out=b_all[layer])
        return
    for layer, (a, b, r, scale) in pairs.items():
        a_all[layer, :r].copy_(a.view(r, in_f))
        b = b.view(out_f, r)
        torch.mul(b if b.dtype in (dtype, torch.float32) else b.float(), scale, out=b_all[layer, :, :r])


# Host copies at least this large come from HostMemory (populated, recycled memory maps) or their own
# populated memory map (see _host_buffer); smaller ones from torch's allocator.
HOST_MMAP_MIN_BYTES = 2**20


def _host_buffer(
    numel: int, dtype: torch.dtype, pin_memory: bool, memory: HostMemory | None = None, zero: bool = True
) -> torch.Tensor:
    """A 1-D host buffer of `numel` elements for an adapter's host copy, zero-filled unless zero=False.
    Every load adds such copies to the host tier, so without `memory` this is memory the process never
    touched, paid for with a page fault per 4 KiB page (several ms per 10 MB, ten times that in some
    VMs): a large buffer then comes from HostMemory, which recycles the blocks of host copies that were
    freed (see host_memory.py), or without it from a memory map of its own made with MAP_POPULATE (one
    call instead of a fault per page). Pinned memory (CUDA) comes from
    torch, whose pinned allocator caches blocks itself."""
    nbytes = numel * dtype.itemsize
    if pin_memory or nbytes < HOST_MMAP_MIN_BYTES or not POOLED:
        return torch.zeros(numel, dtype=dtype, pin_memory=pin_memory)
    if memory is None:
        return torch.frombuffer(mmap.mmap(-1, nbytes, flags=MAP_FLAGS), dtype=dtype, count=numel)
    return memory.take(nbytes, zero=zero).view(dtype)


def load_peft_adapter(
    name: str,
    path: Path,
    base: BaseShapes,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    *,
    pin_memory: bool = False,
    with_rows: bool = False,
    memory: HostMemory | None = None,
) -> LoraAdapter:
    """Parse and validate one adapter directory. Raises an AdapterError subclass naming the adapter.
    pin_memory: place the host copy in page-locked memory (CUDA). with_rows: keep the transposed copy
    too (AdapterWeights.rows), for slots with CPU row tables. memory: where the host copies' buffers
    come from (see _host_buffer)."""
    cfg = read_adapter_config(name, path)
    _check_config(name, cfg, base, max_rank)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        if (path / PICKLE_FILE).is_file():
            raise AdapterFormatError(
                name,
                f"only {PICKLE_FILE} (a pickle) was found; loraplex loads safetensors only, since a pickle can "
                "run code. Convert it with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True)",
            )
        raise AdapterFormatError(name, f"missing {WEIGHTS_FILE} in {path}")
    try:
        config_bytes = (path / CONFIG_FILE).read_bytes()
    except OSError as exc:
        raise AdapterFormatError(name, f"cannot read {CONFIG_FILE}: {exc}") from exc
    digest = _Digest()
    try:
        digest.part(len(config_bytes))
        digest.feed(config_bytes)
        _, raw = _read_tensors(name, weights_path, digest)  # the views are only read: the digest's bytes
        weights = _host_copy(name, cfg, raw, base, max_rank, dtype, pin_memory, with_rows, memory)
    finally:
        hexdigest = digest.result()  # also on errors: the read buffer is reused by this thread's next read
    return LoraAdapter(
        name=name,
        path=path,
        rank=max(weights.ranks.values()),
        alpha=float(cfg.get("lora_alpha", 8)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=sorted(weights.stacked),
        weights=weights,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        digest=hexdigest,
    )


def _host_copy(
    name: str,
    cfg: dict,
    raw: FlatTensors,
    base: BaseShapes,
    max_rank: int,
    dtype: torch.dtype,
    pin_memory: bool,
    with_rows: bool,
    memory: HostMemory | None,
) -> AdapterWeights:
    """Validate the file's tensors against the base model and build the host copy (see AdapterWeights)."""
    pairs: dict[tuple[int, str], dict[str, tuple[torch.Tensor, tuple[int, ...]]]] = {}
    for key, t in raw.items():
        parsed = _parse_key(key)
        if parsed is None:
            if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
                raise UnsupportedAdapterError(name, f"LoRA on embeddings / lm_head is not supported ({key})")
            if "lora_magnitude_vector" in key:
                raise UnsupportedAdapterError(name, "DoRA weights are not supported", param="use_dora")
            raise UnsupportedAdapterError(name, f"unsupported tensor {key!r} in {WEIGHTS_FILE}")
        layer, module, which = parsed
        if module not in base.modules:
            raise UnsupportedAdapterError(name, f"target module {module!r} (tensor {key}) is not supported")
        if layer >= base.num_layers:
            raise AdapterShapeError(name, f"tensor {key} is for layer {layer}; the base model has {base.num_layers}")
        pairs.setdefault((layer, module), {})[which] = t
    if not pairs:
        raise AdapterFormatError(name, f"{WEIGHTS_FILE} holds no LoRA tensors")

    # Validate every shape first (from the header: no tensor op), then cast, scale and place each
    # module's tensors.
    per_module: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, int, float]]] = {}
    ranks: dict[tuple[int, str], int] = {}
    scale_of = _scales(cfg)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(name, f"layer {layer} {module}: lora_A or lora_B is missing")
        (a, a_shape), (b, b_shape) = ab["A"], ab["B"]
        in_f, out_f = base.modules[module]
        r = a_shape[0] if a_shape else 0
        if len(a_shape) != 2 or r == 0 or a_shape[1] != in_f or b_shape != (out_f, r):
            raise AdapterShapeError(
                name,
                f"layer {layer} {module}: lora_A {a_shape} / lora_B {b_shape} do not fit the base "
                f"model (expected ({r}, {in_f}) and ({out_f}, {r}))",
            )
        if r > max_rank:
            raise AdapterShapeError(name, f"rank {r} is above the configured maximum --max-lora-rank {max_rank}")
        per_module.setdefault(module, {})[layer] = (a, b, r, scale_of(layer, module, r))
        ranks[(layer, module)] = r
    # All modules' buffers are views of one allocation, back to back: one allocation, and one finite
    # check over all of it.
    num_layers = base.num_layers
    layout: list[tuple[str, int, bool, tuple[int, ...], tuple[int, ...]]] = []
    total = 0
    for module, layers in per_module.items():
        in_f, out_f = base.modules[module]
        r_m = max(r for _, _, r, _ in layers.values())
        full = len(layers) == num_layers and all(r == r_m for _, _, r, _ in layers.values())
        layout.append((module, total, full, (num_layers, r_m, in_f), (num_layers, out_f, r_m)))
        total += num_layers * r_m * (in_f + out_f)
    # zero unless every module kind fills its whole buffer: padding (lower ranks, untargeted layers) is zero
    host = _host_buffer(total, dtype, pin_memory, memory, zero=not all(full for _, _, full, _, _ in layout))
    stacked = {}
    for module, offset, full, a_shape, b_shape in layout:
        a_numel = math.prod(a_shape)
        a_all = host[offset : offset + a_numel].view(a_shape)
        b_all = host[offset + a_numel : offset + a_numel + math.prod(b_shape)].view(b_shape)
        _stack_module(per_module[module], a_all, b_all, full)
        stacked[module] = (a_all, b_all)
    weights = AdapterWeights(stacked, ranks, num_layers)
    # After the cast and the scale: a value they overflow counts too. Padding is zero (finite).
    if not _all_finite(host):
        layer, module = next(k for k, (a, b) in weights.items() if not (_all_finite(a) and _all_finite(b)))
        raise AdapterFormatError(name, f"layer {layer} {module}: non-finite values (NaN/Inf) in the weights")
    if with_rows:
        weights.rows = transposed_rows(weights, pin_memory, memory)
    return weights


def transposed_rows(
    weights: AdapterWeights, pin_memory: bool = False, memory: HostMemory | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The AdapterWeights.rows layout of `weights` (module -> contiguous (A^T, B^T) of all layers), views
    of one buffer (see _host_buffer)."""
    tensors = [t for ab in weights.stacked.values() for t in ab]
    if not tensors:
        return {}
    # every element is written below: no need to zero a recycled buffer
    buf = _host_buffer(sum(t.numel() for t in tensors), tensors[0].dtype, pin_memory, memory, zero=False)
    rows, offset = {}, 0
    for module, ab in weights.stacked.items():
        pair = []
        for t in ab:  # [L, m, n] -> a contiguous [L, n, m] copy
            out = buf[offset : offset + t.numel()].view(t.shape[0], t.shape[2], t.shape[1])
            pair.append(out.copy_(t.transpose(1, 2)))
            offset += t.numel()
        rows[module] = (pair[0], pair[1])
    return rows
