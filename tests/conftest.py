"""Shared pytest setup. Keep the interpreter switch first: it must precede any @triton.jit."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA, Triton kernels run on CPU tensors under the interpreter, which must be switched on
# before any @triton.jit function is defined (i.e. before loraplex.kernels.lora_* are imported).
# With CUDA the kernels compile for real, unless the caller already set TRITON_INTERPRET.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
