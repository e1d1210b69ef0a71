"""Calls a loraplex server with the official, unmodified LoRAX client (lorax-client 0.6.3).

Run by tests/test_lorax_api.py with the Python of a separate venv that has `lorax-client` (it pins
huggingface-hub<1, which transformers 5 cannot live with), so this file imports nothing of loraplex
and asserts nothing: it prints what the client returned or raised, as one JSON object, and the test
judges it.

    python lorax_client_calls.py '{"url": ..., "adapter": ..., "prompt": ..., "stop": ..., "unknown": ...}'
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback


def dump(value):
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def outcome(fn):
    """{"ok": result} or {"error": class name, "module": ..., "message": str}."""
    try:
        return {"ok": dump(fn())}
    except Exception as exc:  # noqa: BLE001 - the test judges what was raised
        return {"error": type(exc).__name__, "module": type(exc).__module__, "message": str(exc)}


async def aoutcome(coro_fn):
    try:
        return {"ok": dump(await coro_fn())}
    except Exception as exc:  # noqa: BLE001
        return {"error": type(exc).__name__, "module": type(exc).__module__, "message": str(exc)}


def main() -> None:
    from lorax import AsyncClient, Client

    spec = json.loads(sys.argv[1])
    url, adapter, prompt, n = spec["url"], spec["adapter"], spec["prompt"], spec["max_new_tokens"]
    client = Client(url, timeout=120)
    out: dict = {}
    out["generate"] = outcome(lambda: client.generate(prompt, adapter_id=adapter, max_new_tokens=n))
    out["generate_base"] = outcome(lambda: client.generate(prompt, max_new_tokens=n))
    out["generate_details"] = outcome(
        lambda: client.generate(prompt, adapter_id=adapter, max_new_tokens=n, details=True)
    )
    out["generate_full_text"] = outcome(
        lambda: client.generate(prompt, adapter_id=adapter, max_new_tokens=n, return_full_text=True)
    )
    out["generate_stream"] = outcome(
        lambda: [r.model_dump(mode="json") for r in client.generate_stream(prompt, adapter_id=adapter, max_new_tokens=n)]
    )
    out["generate_stop"] = outcome(
        lambda: client.generate(
            prompt, adapter_id=adapter, max_new_tokens=n, stop_sequences=[spec["stop"]], details=True
        )
    )
    sampled = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 1234, "details": True}
    out["sampled"] = [
        outcome(lambda: client.generate(prompt, adapter_id=adapter, max_new_tokens=n, **sampled)) for _ in range(2)
    ]
    out["sampled_stream"] = outcome(
        lambda: [
            r.model_dump(mode="json")
            for r in client.generate_stream(
                prompt, adapter_id=adapter, max_new_tokens=n, do_sample=True, temperature=0.9, top_p=0.95, seed=1234
            )
        ]
    )
    out["unknown"] = outcome(lambda: client.generate(prompt, adapter_id=spec["unknown"], max_new_tokens=n))
    out["unknown_stream"] = outcome(
        lambda: list(client.generate_stream(prompt, adapter_id=spec["unknown"], max_new_tokens=n))
    )
    out["too_long"] = outcome(lambda: client.generate(prompt, adapter_id=adapter, max_new_tokens=10**6))

    async def run_async() -> dict:
        aclient = AsyncClient(url, timeout=120)

        async def stream() -> list:
            return [r.model_dump(mode="json") async for r in aclient.generate_stream(prompt, adapter_id=adapter, max_new_tokens=n)]

        async def unknown_stream() -> list:
            return [r async for r in aclient.generate_stream(prompt, adapter_id=spec["unknown"], max_new_tokens=n)]

        return {
            "generate": await aoutcome(lambda: aclient.generate(prompt, adapter_id=adapter, max_new_tokens=n, details=True)),
            "generate_stream": await aoutcome(stream),
            "sampled": await aoutcome(
                lambda: aclient.generate(prompt, adapter_id=adapter, max_new_tokens=n, **sampled)
            ),
            "unknown": await aoutcome(lambda: aclient.generate(prompt, adapter_id=spec["unknown"], max_new_tokens=n)),
            "unknown_stream": await aoutcome(unknown_stream),
        }

    out["async"] = asyncio.run(run_async())
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(2)
