"""LoRAX / TGI-compatible POST /generate, /generate_stream, and POST / (TGI's compat route, which the
official LoRAX client uses: `"stream": false` answers a JSON array of one /generate response,
`"stream": true` the /generate_stream events).

Request: `{"inputs": str, "parameters": {...}, "stream": bool}` with every field lorax-client 0.6.3
sends in `parameters` (see `schemas.parse_generate`); `adapter_id` is an adapter name as for the OpenAI
`model` (empty: the base model). /generate answers `{"generated_text", "details"?}`, `details` being
`{"finish_reason", "prompt_tokens", "generated_tokens", "seed", "prefill", "tokens"}`; /generate_stream
sends one SSE event per token, `{"token": {"id", "text", "logprob", "special"}, "generated_text": null,
"details": null}`, the last one carrying `generated_text` and `details`. Errors use TGI's body
`{"error": message, "error_type"}` (server/errors.py `tgi_error`), which the LoRAX client raises as its
typed exceptions.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine.protocol import EngineClient, RequestOutput
from ..scheduler.sampling_params import SamplingParams
from .errors import tgi_error
from .generation import Choice, EventStream, finite_logprob, sse
from .schemas import MAX_SEED, GenerateRequest, parse_generate
from .state import Call, ServerState


async def generate(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    return await state.handle(
        request,
        "generate",
        lambda call, body: _generate(state, call, parse_generate(body), stream=False),
        tgi_errors=True,
    )


async def generate_stream(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    return await state.handle(
        request,
        "generate_stream",
        lambda call, body: _generate(state, call, parse_generate(body), stream=True),
        tgi_errors=True,
    )


async def compat_generate(request: Request) -> Response:
    """POST /: `"stream": true` streams as /generate_stream; otherwise a JSON array of one response."""
    state: ServerState = request.app.state.loraplex

    async def run(call: Call, body: Any) -> Response:
        req = parse_generate(body)
        return await _generate(state, call, req, stream=req.stream, as_list=True)

    return await state.handle(request, "compat_generate", run, tgi_errors=True)


def _finish_reason(engine: EngineClient, req: GenerateRequest, c: Choice) -> str:
    if c.finish_reason == "length":
        return "length"
    stops = req.sampling.params["stop"]
    if stops and any(s in engine.decode(c.token_ids) for s in stops):
        return "stop_sequence"
    return "eos_token"


async def _generate(
    state: ServerState, call: Call, req: GenerateRequest, stream: bool, as_list: bool = False
) -> Response:
    adapter = state.resolve_model(call, req.adapter)
    ids = await state.encode(req.inputs)
    if req.truncate is not None:
        ids = ids[-req.truncate :]
    max_tokens = req.sampling.max_tokens or 20
    state.check_fits(ids, max_tokens)
    want_logprobs = req.alternatives if (stream or req.details) else None
    sampling = dict(req.sampling.params)
    if sampling["temperature"] > 0 and sampling["seed"] is None:
        # TGI reports the seed a sampled request used, so that it can be replayed: pick one here.
        sampling["seed"] = secrets.randbelow(MAX_SEED)
    params = SamplingParams(max_tokens=max_tokens, logprobs=want_logprobs, **sampling)
    job, _ = await state.start_job(call, adapter, [ids], params, 1, "gen")
    engine = state.require_engine()
    prefix = req.inputs if req.return_full_text else ""
    seed = params.seed if params.temperature > 0 else None

    def details(c: Choice, with_tokens: bool) -> dict:
        out: dict[str, Any] = {
            "finish_reason": _finish_reason(engine, req, c),
            "prompt_tokens": len(ids),
            "generated_tokens": c.num_output_tokens,
            "seed": seed,
        }
        if with_tokens:
            out["prefill"] = []
            out["tokens"] = [_token(engine, t, lp, None, top=top) for t, lp, top in c.logprobs]
        return out

    if not stream:
        await state.finish_job(call, job, adapter)
        (c,) = job.choices
        result: dict[str, Any] = {"generated_text": prefix + c.text}
        if req.details:
            result["details"] = details(c, with_tokens=True)
        return JSONResponse([result] if as_list else result, headers=state.version_headers(call))

    first = await state.first_event(call, job, adapter)

    async def events() -> AsyncIterator[str]:
        try:
            event: tuple[Choice, RequestOutput] | None = first
            while event is not None:
                c, out = event
                if out.finish_reason == "error":
                    yield sse(tgi_error(state.generation_error(adapter, out.error)))
                    break
                entries = list(out.new_logprobs or [])
                if not entries and out.finished:  # EOS ends the text without a visible token
                    eos = engine.eos_token_id if engine.eos_token_id is not None else 0
                    entries = [(eos, 0.0, [])]
                for i, (token_id, lp, top) in enumerate(entries):
                    last = i == len(entries) - 1
                    text = out.new_text if last else ""
                    final = last and out.finished
                    special = final and not out.new_token_ids
                    yield sse(
                        {
                            "token": _token(engine, token_id, lp, text, special=special, top=top),
                            "generated_text": prefix + c.text if final else None,
                            "details": details(c, with_tokens=False) if final else None,
                        }
                    )
                event = await job.next_event()
        finally:
            await job.close()

    return EventStream(events(), state.stream_ended(call), state.version_headers(call))


def _token(
    engine: EngineClient,
    token_id: int,
    logprob: float,
    text: str | None,
    special: bool = False,
    top: list[tuple[int, float]] | None = None,
) -> dict:
    shown = engine.decode([token_id]) if text is None else text
    out: dict[str, Any] = {"id": token_id, "text": shown, "logprob": finite_logprob(logprob), "special": special}
    if top:  # return_k_alternatives
        out["alternative_tokens"] = [
            {"id": t, "text": engine.decode([t]), "logprob": finite_logprob(lp)} for t, lp in top
        ]
    return out
