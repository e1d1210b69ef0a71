"""POST /v1/completions and /v1/chat/completions (OpenAI shapes; streamed as SSE ending in [DONE])."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine.protocol import EngineClient, RequestOutput
from ..scheduler.sampling_params import SamplingParams
from .generation import Choice, EventStream, finite_logprob, sse
from .schemas import ChatRequest, CompletionRequest, Sampling, parse_chat, parse_completion
from .state import VERSION_HEADER, Call, ServerState
from .structured import ToolCallParser, ToolChoice


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    return await state.handle(request, "completions", lambda call, body: _completion(state, call, body))


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.loraplex
    return await state.handle(request, "chat_completions", lambda call, body: _chat(state, call, body))


def _params(
    state: ServerState, sampling: Sampling, prompt_ids: list[int], logprobs: int | None
) -> SamplingParams:
    max_tokens = sampling.max_tokens
    if max_tokens is None:  # chat default: the rest of the context
        max_tokens = max(1, state.require_engine().info.max_model_len - len(prompt_ids))
    state.check_fits(prompt_ids, max_tokens)
    defaults = state.require_engine().info.sampling_defaults
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **sampling.resolved(defaults))


# ---- completions ----------------------------------------------------------------------------------
async def _completion(state: ServerState, call: Call, body: Any) -> Response:
    req: CompletionRequest = parse_completion(body)
    adapter = state.resolve_model(call, req.model, req.user)
    model = call.label
    prompts = [await state.encode(p) for p in req.prompts]
    params = _params(state, req.sampling, prompts[0], req.logprobs)
    for ids in prompts[1:]:
        state.check_fits(ids, params.max_tokens)
    job, rid = await state.start_job(call, adapter, prompts, params, req.sampling.n, "cmpl")
    engine = state.require_engine()

    def fingerprint() -> str:  # the adapter version that served (known once the first output came)
        return state.version_headers(call)[VERSION_HEADER]

    n = req.sampling.n
    echoes = [(p if isinstance(p, str) else engine.decode(p)) if req.echo else "" for p in req.prompts]
    created = int(time.time())

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        out = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
        }
        if req.sampling.include_usage or usage is not None:
            out["usage"] = usage
        return out

    if not req.sampling.stream:
        await state.finish_job(call, job, adapter)
        choices = []
        for c in job.choices:
            echo = echoes[c.index // n]
            lp = _completion_logprobs(engine, c.logprobs, len(echo)) if req.logprobs is not None else None
            choices.append(
                {"index": c.index, "text": echo + c.text, "logprobs": lp, "finish_reason": c.finish_reason}
            )
        return JSONResponse(chunk(choices, job.usage), headers=state.version_headers(call))

    first = await state.first_event(call, job, adapter)

    async def events() -> AsyncIterator[str]:
        try:
            offsets = {c.index: len(echoes[c.index // n]) for c in job.choices}
            for c in job.choices:
                if echoes[c.index // n]:
                    yield sse(
                        chunk(
                            [
                                {
                                    "index": c.index,
                                    "text": echoes[c.index // n],
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
            event: tuple[Choice, RequestOutput] | None = first
            while event is not None:
                c, out = event
                if out.finish_reason == "error":
                    yield sse(state.generation_error(adapter, out.error).to_openai())
                elif out.new_text or out.finished or (req.logprobs is not None and out.new_token_ids):
                    lp = None
                    if req.logprobs is not None:
                        lp = _completion_logprobs(engine, out.new_logprobs or [], offsets[c.index])
                        offsets[c.index] += sum(len(t) for t in lp["tokens"])
                    finish = c.finish_reason if out.finished else None
                    yield sse(
                        chunk(
                            [
                                {
                                    "index": c.index,
                                    "text": out.new_text,
                                    "logprobs": lp,
                                    "finish_reason": finish,
                                }
                            ]
                        )
                    )
                event = await job.next_event()
            if req.sampling.include_usage:
                yield sse(chunk([], job.usage))
            yield sse("[DONE]")
        finally:
            await job.close()

    return EventStream(events(), state.stream_ended(call), state.version_headers(call))


def _completion_logprobs(engine: EngineClient, entries: list[tuple], offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, lp, top in entries:
        text = engine.decode([token_id])
        tokens.append(text)
        token_lps.append(finite_logprob(lp))
        tops.append({engine.decode([t]): finite_logprob(v) for t, v in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


# ---- chat -----------------------------------------------------------------------------------------
async def _chat(state: ServerState, call: Call, body: Any) -> Response:
    req: ChatRequest = parse_chat(body)
    adapter = state.resolve_model(call, req.model, req.user)
    model = call.label
    ids = await state.chat_ids(req.messages, adapter)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(state, req.sampling, ids, logprobs)
    job, rid = await state.start_job(call, adapter, [ids], params, req.sampling.n, "chatcmpl")
    engine = state.require_engine()
    created = int(time.time())

    def fingerprint() -> str:  # the adapter version that served (known once the first output came)
        return state.version_headers(call)[VERSION_HEADER]

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        out = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
        }
        if req.sampling.include_usage or usage is not None:
            out["usage"] = usage
        return out

    if not req.sampling.stream:
        await state.finish_job(call, job, adapter)
        choices = [_chat_choice(c, engine, req.logprobs, req.tool) for c in job.choices]
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
        }
        return JSONResponse({**body, "usage": job.usage}, headers=state.version_headers(call))

    first = await state.first_event(call, job, adapter)

    # forced tool calls: each choice's text goes through its own parser, out as tool-call deltas
    parsers = {c.index: ToolCallParser(req.tool) for c in job.choices} if req.tool is not None else {}

    async def events() -> AsyncIterator[str]:
        try:
            for c in job.choices:
                delta = {"role": "assistant", "content": None if parsers else ""}
                yield sse(
                    chunk([{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}])
                )
            event: tuple[Choice, RequestOutput] | None = first
            while event is not None:
                c, out = event
                if out.finish_reason == "error":
                    yield sse(state.generation_error(adapter, out.error).to_openai())
                else:
                    lp = (
                        {"content": _chat_logprobs(engine, out.new_logprobs or [])}
                        if req.logprobs
                        else None
                    )
                    if parsers:
                        for call in parsers[c.index].feed(out.new_text):
                            calls = {"tool_calls": [call]}
                            yield sse(
                                chunk([{"index": c.index, "delta": calls, "logprobs": lp, "finish_reason": None}])
                            )
                            lp = None
                    elif out.new_text or (lp and lp["content"]):
                        delta = {"content": out.new_text}
                        yield sse(
                            chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
                        )
                    if out.finished:
                        yield sse(
                            chunk(
                                [
                                    {
                                        "index": c.index,
                                        "delta": {},
                                        "logprobs": None,
                                        "finish_reason": _finish_reason(c, req.tool),
                                    }
                                ]
                            )
                        )
                event = await job.next_event()
            if req.sampling.include_usage:
                yield sse(chunk([], job.usage))
            yield sse("[DONE]")
        finally:
            await job.close()

    return EventStream(events(), state.stream_ended(call), state.version_headers(call))


def _chat_choice(c: Choice, engine: EngineClient, logprobs: bool, tool: ToolChoice | None) -> dict:
    message: dict = {"role": "assistant", "content": c.text}
    if tool is not None:
        parser = ToolCallParser(tool)
        parser.feed(c.text)
        message = {"role": "assistant", "content": None, "tool_calls": parser.calls}
    return {
        "index": c.index,
        "message": message,
        "logprobs": {"content": _chat_logprobs(engine, c.logprobs)} if logprobs else None,
        "finish_reason": _finish_reason(c, tool),
    }


def _finish_reason(c: Choice, tool: ToolChoice | None) -> str | None:
    """OpenAI's: a forced named function ends with "stop", `tool_choice: "required"` with "tool_calls";
    "length" when max_tokens cut the output first (its JSON may then be incomplete)."""
    if tool is not None and tool.mode == "required" and c.finish_reason == "stop":
        return "tool_calls"
    return c.finish_reason


def _token_entry(engine: EngineClient, token_id: int, lp: float) -> dict:
    text = engine.decode([token_id])
    return {"token": text, "logprob": finite_logprob(lp), "bytes": list(text.encode("utf-8"))}


def _chat_logprobs(engine: EngineClient, entries: list[tuple]) -> list[dict]:
    return [
        {**_token_entry(engine, t, lp), "top_logprobs": [_token_entry(engine, a, v) for a, v in top]}
        for t, lp, top in entries
    ]
