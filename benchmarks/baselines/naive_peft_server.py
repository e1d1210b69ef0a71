"""The naive baseline: transformers + PEFT behind the same OpenAI routes, one request at a time.

What most teams write first: every adapter loaded into one PeftModel (`load_adapter`), a global lock
(here: a one-thread executor), and per request `set_adapter(name)` (or `disable_adapter()` for the base
model) followed by `generate`, streamed token by token. No batching across requests.

    python benchmarks/baselines/naive_peft_server.py --model DIR --adapter-dir DIR --port 8001
    python benchmarks/baselines/naive_peft_server.py --adapter a=./a --adapter b=./b   # default model

Routes: POST /v1/completions and /v1/chat/completions (`model`, `prompt` / `messages`, `max_tokens` /
`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stream`, `stream_options.include_usage`,
`ignore_eos`), GET /v1/models, /health, /ready. Needs `pip install peft` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria
from transformers.generation.streamers import BaseStreamer


class TokenStream(BaseStreamer):
    """Hands generated token ids from the generate thread to the event loop; None marks the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue, self.seen_prompt = loop, asyncio.Queue(), False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first puts the prompt
            self.seen_prompt = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class Cancelled(StoppingCriteria):
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class NaiveServer:
    def __init__(self, model_dir: str, adapters: list[tuple[str, str]], dtype: str, name: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.model = base
        if adapters:
            from peft import PeftModel

            (first, path), rest = adapters[0], adapters[1:]
            self.model = PeftModel.from_pretrained(base, path, adapter_name=first).eval()
            for adapter, path in rest:
                self.model.load_adapter(path, adapter_name=adapter)
        self.adapters = [a for a, _ in adapters]
        self.name = name
        self.worker = ThreadPoolExecutor(max_workers=1)  # the global lock: one generate at a time

    def generate(self, adapter: str | None, ids: list[int], body: dict, stream: TokenStream, stop: Cancelled):
        """Runs on the worker thread (so set_adapter never changes under a running generate)."""
        max_tokens = body["max_tokens"]
        kwargs = dict(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens if body.get("ignore_eos") else None,
            do_sample=body["temperature"] > 0,
            temperature=body["temperature"] if body["temperature"] > 0 else None,
            top_p=body.get("top_p", 1.0) if body["temperature"] > 0 else None,
            top_k=None,
            streamer=stream,
            stopping_criteria=[stop],
            pad_token_id=self.tokenizer.eos_token_id,
        )
        try:
            if body.get("seed") is not None:
                torch.manual_seed(body["seed"])
            with torch.inference_mode():
                if adapter is None and self.adapters:
                    with self.model.disable_adapter():
                        self.model.generate(**kwargs)
                else:
                    if adapter is not None:
                        self.model.set_adapter(adapter)
                    self.model.generate(**kwargs)
        finally:
            stream.end()

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            text = self.tokenizer.apply_chat_template(
                body["messages"], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return prompt
        if isinstance(prompt, list):
            prompt = prompt[0]
        return self.tokenizer(prompt)["input_ids"]


def error(status: int, message: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status)


def create_app(server: NaiveServer) -> Starlette:
    async def handle(request: Request, chat: bool) -> Response:
        try:
            body = await request.json()
            model = body["model"]
            body["max_tokens"] = int(
                body.get("max_completion_tokens") or body.get("max_tokens") or (256 if chat else 16)
            )
            body["temperature"] = float(body.get("temperature", 1.0))
        except (ValueError, KeyError, TypeError) as exc:
            return error(400, f"bad request: {exc}")
        if model != server.name and model not in server.adapters:
            return error(404, f"The model `{model}` does not exist.", "model_not_found")
        adapter = None if model == server.name else model
        ids = server.prompt_ids(body, chat)
        loop = asyncio.get_running_loop()
        stream, stop = TokenStream(loop), Cancelled()
        future = loop.run_in_executor(server.worker, server.generate, adapter, ids, body, stream, stop)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        out_ids: list[int] = []

        async def pieces():
            """New text as tokens arrive (held back while it ends mid-character); counts into out_ids."""
            sent = ""
            while (new := await stream.queue.get()) is not None:
                out_ids.extend(new)
                text = server.tokenizer.decode(out_ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue
                yield text[len(sent) :]
                sent = text
            await future  # raise what generate raised
            yield server.tokenizer.decode(out_ids, skip_special_tokens=True)[len(sent) :]

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def choice(text: str, finish: str | None, final: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            key = "message" if final else "delta"
            return {"index": 0, key: {"role": "assistant", "content": text} if final else {"content": text},
                    "logprobs": None, "finish_reason": finish}  # fmt: skip

        if not body.get("stream"):
            parts = [text async for text in pieces()]
            n = len(out_ids)
            finish = "length" if n >= body["max_tokens"] else "stop"
            obj = {"id": rid, "object": kind, "created": created, "model": model,
                   "choices": [choice("".join(parts), finish, final=True)], "usage": usage(n)}  # fmt: skip
            return JSONResponse(obj)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def sse(choices: list[dict], use: dict | None = None) -> str:
            obj = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model,
                   "choices": choices}  # fmt: skip
            if include_usage:
                obj["usage"] = use
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            try:
                if chat:
                    yield sse(
                        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                    )
                async for text in pieces():
                    if text:
                        yield sse([choice(text, None)])
                n = len(out_ids)
                finish = "length" if n >= body["max_tokens"] else "stop"
                yield sse(
                    [choice("", finish) if not chat else {"index": 0, "delta": {}, "finish_reason": finish}]
                )
                if include_usage:
                    yield sse([], usage(n))
                yield "data: [DONE]\n\n"
            finally:
                stop.event.set()  # a client that left stops its generate at the next token

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    async def models(request: Request) -> Response:
        cards = [{"id": server.name, "object": "model", "owned_by": "naive-peft", "parent": None}]
        cards += [
            {"id": a, "object": "model", "owned_by": "naive-peft", "parent": server.name}
            for a in server.adapters
        ]
        return JSONResponse({"object": "list", "data": cards})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
            Route("/ready", health),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=None, help="HF model dir (default: loraplex's converted default model)"
    )
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument(
        "--adapter-dir", default=None, help="every subfolder with adapter_config.json is an adapter"
    )
    ap.add_argument(
        "--served-model-name", default=None, help="the base model's name (default: the folder name)"
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    if args.model is None:
        from loraplex.engine.loader import resolve_model_dir

        args.model = str(resolve_model_dir(None))
    adapters = [tuple(a.split("=", 1)) for a in args.adapter]
    if args.adapter_dir:
        folders = sorted(p for p in Path(args.adapter_dir).iterdir() if (p / "adapter_config.json").is_file())
        adapters += [(p.name, str(p)) for p in folders]
    t0 = time.perf_counter()
    server = NaiveServer(args.model, adapters, args.dtype, args.served_model_name or Path(args.model).name)
    print(
        f"loaded {args.model} with {len(adapters)} adapters in {time.perf_counter() - t0:.1f} s", flush=True
    )
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
