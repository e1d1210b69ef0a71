"""Zero-copy tensor views of safetensors data (a memory map or bytes read once), shared by the base
model loader and the adapter reader. Every entry is checked against the buffer before it is viewed."""

from __future__ import annotations

import json
import math

import torch

ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 2**20


def parse_header(buf: bytes | bytearray | memoryview) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data section) of a whole safetensors
    file in `buf`. Raises ValueError on a malformed header."""
    if len(buf) < 8:
        raise ValueError(f"file of {len(buf)} bytes is too short")
    n = int.from_bytes(bytes(buf[:8]), "little")
    if n <= 0 or n > min(MAX_HEADER_BYTES, len(buf) - 8):
        raise ValueError(f"bad header length {n}")
    header = json.loads(bytes(buf[8 : 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def _entry(info: object, data_start: int, size: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of header entry `info`, checked against a buffer of `size` bytes whose
    data section starts at `data_start`. Raises ValueError when the entry is malformed or reaches
    outside the data section."""
    try:  # anything but a JSON object with these keys raises one of these (no isinstance: it runs per tensor)
        dtype = ST_DTYPES[info["dtype"]]  # type: ignore[index]
        o0, o1 = info["data_offsets"]  # type: ignore[index]
        begin, end = data_start + int(o0), data_start + int(o1)
        shape = [int(d) for d in info["shape"]]  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad entry ({exc!r})") from exc
    elem, numel = dtype.itemsize, math.prod(shape)
    if min(shape, default=0) < 0 or begin < data_start or end > size or end - begin != numel * elem:
        raise ValueError("truncated or inconsistent entry")
    if begin % elem:
        raise ValueError(f"entry at offset {begin} is not aligned to its {elem}-byte elements")
    return dtype, shape, begin, end


def tensor_view(buf, info: object, data_start: int, size: int) -> torch.Tensor:
    """The tensor of header entry `info`, a view of the writable buffer `buf` (a memory map or a
    bytearray) of `size` bytes whose data section starts at `data_start`. Raises ValueError when the
    entry is malformed or reaches outside the data section."""
    dtype, shape, begin, end = _entry(info, data_start, size)
    numel = math.prod(shape)
    if not numel:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=begin).view(shape)


def flat_views(
    buf, header: dict, data_start: int, size: int
) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """name -> (its elements as a 1-D view of `buf`, its shape) for every entry of `header`, each checked
    as tensor_view checks it. When the entries share one dtype and tile one range of the buffer (what
    safetensors writers produce), the views come from one split of one view (C++, not a Python call per
    tensor: ~10x cheaper for the few hundred tensors of an adapter); else one view per entry."""
    entries = {key: _entry(info, data_start, size) for key, info in header.items()}
    if not entries:
        return {}
    order = sorted(entries, key=lambda k: entries[k][2])
    dtype = entries[order[0]][0]
    first, last = entries[order[0]][2], entries[order[-1]][3]
    tiled = all(entries[k][0] == dtype for k in order) and all(
        entries[a][3] == entries[b][2] for a, b in zip(order, order[1:], strict=False)
    )
    if tiled and last > first:
        elem = dtype.itemsize
        flat = torch.frombuffer(buf, dtype=dtype, count=(last - first) // elem, offset=first)
        sizes = [(entries[k][3] - entries[k][2]) // elem for k in order]
        pieces = dict(zip(order, torch.split_with_sizes(flat, sizes), strict=True))
        return {k: (pieces[k], tuple(shape)) for k, (_, shape, _, _) in entries.items()}  # header order
    out = {}
    for key, (dt, shape, begin, _) in entries.items():
        numel = math.prod(shape)
        if numel:
            out[key] = (torch.frombuffer(buf, dtype=dt, count=numel, offset=begin), tuple(shape))
        else:
            out[key] = (torch.empty(0, dtype=dt), tuple(shape))
    return out
