"""Helpers for the HTTP server tests: a tiny Llama model WITH a tokenizer and chat template, real PEFT
adapters for it, and a `loraplex serve` subprocess on a free local port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tiny_models import save_peft_adapter, save_tiny_model

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? I am fine, thank you.",
    "What is the capital of France? Paris is the capital of France.",
    "Name a color: red, green, blue, yellow, purple.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TARGETS = [
    ["q_proj", "v_proj"],
    "all-linear",
    ["o_proj", "down_proj"],
    ["gate_proj", "up_proj"],
    ["k_proj", "v_proj"],
]


def save_tokenizer(path: Path, vocab_size: int = 320) -> int:
    """A byte-level BPE tokenizer (any text encodes) with <s>=0, </s>=1, <pad>=2 and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return tok.get_vocab_size()


def make_world(root: Path, num_adapters: int) -> tuple[Path, Path]:
    """(base model dir with tokenizer, adapter dir with adapters a0..a{n-1} of mixed ranks/targets)."""
    base = root / "base"
    base.mkdir(parents=True)
    vocab = save_tokenizer(base)
    save_tiny_model(base, "llama", seed=7, vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    adapter_dir = root / "adapters"
    for i in range(num_adapters):
        rank = [2, 4, 8, 16][i % 4]
        save_peft_adapter(
            base, adapter_dir / f"a{i}", rank, 2 * rank, TARGETS[i % 5], i % 3 == 0, seed=100 + i
        )
    return base, adapter_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    first_ready_status: int | None = None  # /ready right after /health first answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Server:
    """Start `loraplex serve ARGS --port <free>`; returns as soon as /health answers (the engine may
    still be building: see wait_ready)."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", *args, "--port", str(port)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    server = Server(proc, port, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                server.first_ready_status = httpx.get(f"{server.url}/ready", timeout=1).status_code
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.terminate()
    raise RuntimeError(f"server did not answer /health:\n{server.log()}")


def wait_ready(server: Server, timeout: float = 120.0) -> list[int]:
    """Poll /ready until 200; returns the statuses seen since /health first answered."""
    seen = [server.first_ready_status]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        status = httpx.get(f"{server.url}/ready", timeout=2).status_code
        if seen[-1] != status:
            seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.05)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")
