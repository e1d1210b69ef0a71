"""A tiny fake OpenAI-compatible server with known delays and failures, for the load generator's tests.

    python tests/fake_openai_server.py PORT

The `model` of a request picks its behaviour: `ok*` streams `max_tokens` tokens, the first after
fake_ttft(seed) seconds (the load generator sends seed = request index), then one every TOKEN_GAP
seconds, then a usage chunk and [DONE]; `missing` answers 404, `crash` 500; `fails-midway` sends an
error event after two tokens; `truncated` ends without usage or [DONE]; `no-usage` sends no usage
chunk; `slow` waits 5 s before its first token.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

TOKEN_GAP = 0.01  # seconds between the fake server's tokens


def fake_ttft(seed: int) -> float:
    """The fake server's time to first token for request `index` (seed = index): 20, 30, ..., 110 ms."""
    return 0.02 + 0.01 * (seed % 10)


async def fake_completion(request: Request):
    body = await request.json()
    model, n, seed = body["model"], body["max_tokens"], body["seed"]
    chat = "messages" in body
    if model == "missing":
        return JSONResponse({"error": {"message": "no such model", "code": "model_not_found"}}, 404)
    if model == "crash":
        return JSONResponse({"error": {"message": "boom"}}, 500)

    def chunk(text: str | None, usage: dict | None = None) -> str:
        if text is None:
            choices = []
        elif chat:
            choices = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
        else:
            choices = [{"index": 0, "text": text, "finish_reason": None}]
        return "data: " + json.dumps({"choices": choices, "usage": usage}) + "\n\n"

    async def events():
        if chat:  # like OpenAI and loraplex: a role chunk with empty content first (not a token)
            yield (
                "data: "
                + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                + "\n\n"
            )
        await asyncio.sleep(5.0 if model == "slow" else fake_ttft(seed))
        for i in range(n):
            if i:
                await asyncio.sleep(TOKEN_GAP)
            yield chunk(f" t{i}")
            if model == "fails-midway" and i == 1:
                yield (
                    "data: "
                    + json.dumps({"error": {"message": "engine error", "type": "server_error"}})
                    + "\n\n"
                )
                return
        if model == "truncated":
            return
        if model != "no-usage":
            yield chunk(None, {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def fake_models(request: Request):
    cards = [{"id": "base", "parent": None}] + [{"id": f"ok{i}", "parent": "base"} for i in range(3)]
    return JSONResponse({"object": "list", "data": cards})


app = Starlette(
    routes=[
        Route("/v1/chat/completions", fake_completion, methods=["POST"]),
        Route("/v1/completions", fake_completion, methods=["POST"]),
        Route("/v1/models", fake_models),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
