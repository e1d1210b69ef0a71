"""LoRAX / TGI-compatible POST /generate and /generate_stream.

Request: `{"inputs": str, "parameters": {"adapter_id", "adapter_source", "max_new_tokens",
"temperature", "top_p", "top_k", "do_sample", "seed", "stop", "repetition_penalty", "details",
"return_full_text"}}`; `adapter_id` is an adapter name as for the OpenAI `model` (empty: the base
model). /generate answers `{"generated_text", "details"?}`; /generate_stream sends one SSE event per
token, `{"token": {"id", "text", "logprob", "special"}, "generated_text": null, "details": null}`,
the last one carrying `generated_text` and `details`. Errors use the OpenAI error body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..scheduler.request import SamplingParams
from .generation import Choice, EventStream, sse
from .openai_api import _finish, _finite, _first_or_error
from .schemas import GenerateRequest, parse_generate
from .state import Call, ServerState


async def generate(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    return await state.handle(
        request, "generate", lambda call, body: _generate(state, call, body, stream=False)
    )


async def generate_stream(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    return await state.handle(
        request, "generate_stream", lambda call, body: _generate(state, call, body, stream=True)
    )


def _finish_reason(tokenizer: Any, req: GenerateRequest, c: Choice) -> str:
    if c.finish_reason == "length":
        return "length"
    stops = req.sampling.params["stop"]
    if stops and any(s in tokenizer.decode(c.token_ids) for s in stops):
        return "stop_sequence"
    return "eos_token"


async def _generate(state: ServerState, call: Call, body: Any, stream: bool) -> Response:
    req = parse_generate(body)
    adapter = state.resolve_model(call, req.adapter)
    ids = await state.encode(req.inputs)
    max_tokens = req.sampling.max_tokens or 20
    state.check_fits(ids, max_tokens)
    want_logprobs = 0 if (stream or req.details) else None
    params = SamplingParams(max_tokens=max_tokens, logprobs=want_logprobs, **req.sampling.params)
    job, _ = await state.start_job(call, adapter, [ids], params, 1, "gen")
    tokenizer = state.engine.tokenizer
    prefix = req.inputs if req.return_full_text else ""

    def details(c: Choice, with_tokens: bool) -> dict:
        out: dict[str, Any] = {
            "finish_reason": _finish_reason(tokenizer, req, c),
            "prompt_tokens": len(ids),
            "generated_tokens": c.num_output_tokens,
            "seed": params.seed,
        }
        if with_tokens:
            out["prefill"] = []
            out["tokens"] = [_token(tokenizer, t, lp, None) for t, lp, _ in c.logprobs]
        return out

    if not stream:
        await _finish(state, call, job, adapter)
        (c,) = job.choices
        result: dict[str, Any] = {"generated_text": prefix + c.text}
        if req.details:
            result["details"] = details(c, with_tokens=True)
        return JSONResponse(result)

    first = await _first_or_error(state, call, job, adapter)

    async def events() -> AsyncIterator[str]:
        try:
            event = first
            while event is not None:
                c, out = event
                if out.finish_reason == "error":
                    yield sse(state.generation_error(adapter, out.error).to_openai())
                    break
                entries = list(out.new_logprobs or [])
                if not entries and out.finished:  # EOS ends the text without a visible token
                    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
                    entries = [(eos, 0.0, [])]
                for i, (token_id, lp, _) in enumerate(entries):
                    last = i == len(entries) - 1
                    text = out.new_text if last else ""
                    final = last and out.finished
                    yield sse(
                        {
                            "token": _token(
                                tokenizer, token_id, lp, text, special=final and not out.new_token_ids
                            ),
                            "generated_text": prefix + c.text if final else None,
                            "details": details(c, with_tokens=False) if final else None,
                        }
                    )
                event = await job.next_event()
        finally:
            await job.close()

    return EventStream(events(), state.stream_ended(call))


def _token(tokenizer: Any, token_id: int, logprob: float, text: str | None, special: bool = False) -> dict:
    shown = tokenizer.decode([token_id]) if text is None else text
    return {"id": token_id, "text": shown, "logprob": _finite(logprob), "special": special}
