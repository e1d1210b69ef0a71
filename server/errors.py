"""HTTP-side errors (on top of loraplex.errors) and the one function that turns any error into the
OpenAI error body `{"error": {"message", "type", "param", "code"}}` with its status."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import InvalidRequestError, LoraplexError

log = logging.getLogger(__name__)


class AuthenticationError(LoraplexError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(LoraplexError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class ModelNotFoundError(LoraplexError):
    """Unknown model, or a model the caller's key may not use: the same body, so that existence of
    another tenant's adapter is not leaked."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, detail: str | None = None) -> None:
        shown = model if len(model) <= 200 else model[:200] + "..."
        message = detail or f"The model '{shown}' does not exist or you do not have access to it."
        super().__init__(message, param="model")


class NotFoundError(LoraplexError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLargeError(LoraplexError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaTypeError(LoraplexError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class QueueFullError(LoraplexError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ServiceUnavailableError(LoraplexError):
    status = 503
    type = "service_unavailable"
    code = "unavailable"


def error_response(
    exc: LoraplexError, headers: dict[str, str] | None = None, *, tgi: bool = False
) -> JSONResponse:
    """The error as a response: the OpenAI body, or with `tgi` the TGI / LoRAX body (`tgi_error`)."""
    headers = dict(headers or {})
    if exc.status in (429, 503):
        headers.setdefault("Retry-After", "1")
    body = tgi_error(exc) if tgi else exc.to_openai()
    return JSONResponse(body, status_code=exc.status, headers=headers)


def tgi_error(exc: LoraplexError) -> dict:
    """The TGI / LoRAX error body of the LoRAX routes: `{"error": message, "error_type"}`, which the LoRAX
    and TGI clients turn into their typed exceptions (error_type "validation" -> ValidationError,
    "overloaded" -> OverloadedError, "generation" -> GenerationError; without one, the status picks:
    404 -> NotFoundError, 422 -> UnprocessableEntityError). `param` and `code` ride along as in OpenAI's."""
    if exc.status in (400, 413, 415):
        error_type = "validation"
    elif exc.status == 429:
        error_type = "overloaded"
    elif exc.code == "generation_failed":
        error_type = "generation"
    else:
        error_type = None
    body = {"error": exc.message, "error_type": error_type, "param": exc.param, "code": exc.code}
    return {k: v for k, v in body.items() if v is not None}


def to_loraplex_error(exc: BaseException) -> LoraplexError:
    """Any exception as a LoraplexError (unexpected ones become a 500 without internals)."""
    if isinstance(exc, LoraplexError):
        return exc
    if isinstance(exc, HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        err = LoraplexError(message, code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        err.status = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return err
    log.exception("unhandled error", exc_info=exc)
    return LoraplexError(f"internal server error ({type(exc).__name__})")


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    """Starlette exception handler for LoraplexError, HTTPException (unknown route, wrong method) and
    anything unexpected: all answer with the OpenAI error body."""
    err = to_loraplex_error(exc)
    headers = getattr(exc, "headers", None) if isinstance(exc, HTTPException) else None
    return error_response(err, headers)


def bad_field(param: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' {why}", param=param)
