"""GET /v1/models (+ /v1/models/{model}) and the vLLM-shaped adapter admin endpoints
POST /v1/load_lora_adapter and /v1/unload_lora_adapter (admin keys only when auth is on)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..errors import AdapterError, AdapterNotFoundError, InvalidRequestError, LoraplexError
from .errors import ModelNotFoundError, NotFoundError
from .schemas import Fields
from .state import VERSION_HEADER, Call, ServerState

LOAD_WAIT_SECONDS = 300.0
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/@:]{0,127}")


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


# ---- models ---------------------------------------------------------------------------------------
async def _model_cards(state: ServerState, call: Call) -> list[dict]:
    engine = state.require_engine()
    base = state.base_name
    max_len = engine.info.max_model_len
    cards = []
    if call.policy is not None and call.policy.may_use(base):
        cards.append(_card(state, base, None, True, "base", max_len))
    rows = await run_in_threadpool(engine.list_adapters)
    for row in rows:
        name = row.name
        if call.policy is not None and call.policy.may_use(name) and not state.is_base(name):
            card = _card(state, name, base, row.tier == "device", row.tier, max_len)
            card["version"] = row.version or name
            if row.retiring:
                card["retiring_versions"] = list(row.retiring)
            cards.append(card)
    for route in state.routes:  # aliases, with their current split (percent per version)
        if call.policy is not None and call.policy.may_use(route.alias):
            card = _card(state, route.alias, base, False, "alias", max_len)
            card["split"] = route.split()
            if route.shadow is not None:
                card["shadow"] = {"version": route.shadow.version, "fraction": route.shadow.fraction}
            cards = [c for c in cards if c["id"] != route.alias] + [card]  # an alias hides a same-named adapter
    return cards


def _card(state: ServerState, name: str, parent: str | None, resident: bool, tier: str, max_len: int) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "loraplex",
        "root": name,
        "parent": parent,
        "resident": resident,
        "tier": tier,
        "max_model_len": max_len,
    }


async def list_models(request: Request) -> Response:
    state = _state(request)

    async def handler(call: Call, body: Any) -> Response:
        return JSONResponse({"object": "list", "data": await _model_cards(state, call)})

    return await state.handle(request, "models", handler, read_body=False)


async def get_model(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["model"]

    async def handler(call: Call, body: Any) -> Response:
        for card in await _model_cards(state, call):
            if card["id"] == name:
                return JSONResponse(card)
        raise ModelNotFoundError(name)

    return await state.handle(request, "models", handler, read_body=False)


# ---- adapter admin (vLLM shapes) ------------------------------------------------------------------
async def load_adapter(request: Request) -> Response:
    """{"lora_name": NAME, "lora_path": DIR}: register DIR under NAME and load it (validated, on host;
    a device slot follows at the next step). Without lora_path: load an already known adapter. With a
    served NAME and another DIR: an in-place update (a new version of NAME; in-flight requests finish
    on the old one; a new version that fails validation leaves the old one serving)."""
    state = _state(request)

    async def handler(call: Call, body: Any) -> Response:
        f = Fields(body)
        name, path = f.string("lora_name"), f.string("lora_path")
        if not name or not _ADAPTER_NAME.fullmatch(name) or ".." in name:
            raise _bad("'lora_name' must be a valid adapter name (letters, digits, '._-/@:')", "lora_name")
        engine = state.require_engine()
        if state.is_base(name):
            raise _bad(f"'{name}' is the base model's name", "lora_name")
        registered = False
        if path is not None:
            if not Path(path).expanduser().is_dir():
                raise _bad(f"lora_path {path!r} is not a directory", "lora_path")
            if not isinstance(engine.admission_error(name), AdapterNotFoundError):  # served: update it
                version = await run_in_threadpool(engine.update_adapter, name, path, LOAD_WAIT_SECONDS)
                return PlainTextResponse(
                    f"Success: LoRA adapter '{name}' updated in place; new requests get version '{version}'.",
                    headers={VERSION_HEADER: version},
                )
            registered = engine.register_adapter(name, path)
        try:
            await run_in_threadpool(engine.load_adapter, name, LOAD_WAIT_SECONDS)
        except AdapterError:
            if registered:
                engine.unregister_adapter(name)
            raise
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    return await state.handle(request, "load_lora_adapter", handler, admin=True)


async def unload_adapter(request: Request) -> Response:
    """{"lora_name": NAME}: drop it from the device and host tiers (refused while requests use it);
    an adapter registered by load_lora_adapter is forgotten."""
    state = _state(request)

    async def handler(call: Call, body: Any) -> Response:
        name = Fields(body).string("lora_name")
        if not name:
            raise _bad("'lora_name' is required", "lora_name")
        engine = state.require_engine()
        users = state.routes.users_of(name)
        if users:
            err = InvalidRequestError(
                f"The lora adapter '{name}' is a version of the alias(es) {', '.join(users)}; "
                "take it out of their routes first.",
                param="lora_name",
                code="adapter_in_route",
            )
            err.status = 409
            raise err
        try:
            found = engine.unload_adapter(name)
        except AdapterError as exc:
            if exc.code == "adapter_in_use":
                exc.status = 409
            raise
        found = engine.unregister_adapter(name) or found
        if not found:
            raise NotFoundError(f"The lora adapter '{name}' is not loaded.", param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return await state.handle(request, "unload_lora_adapter", handler, admin=True)


def _bad(message: str, param: str) -> LoraplexError:
    return InvalidRequestError(message, param=param)
