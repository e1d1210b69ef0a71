"""One exception hierarchy for loraplex. Each error maps to the OpenAI error body
`{"error": {"message", "type", "param", "code"}}` with an HTTP status (no torch here: server/ imports it)."""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class. `status` is the HTTP status, `type`/`code`/`param` fill the OpenAI error body."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(LoraplexError):
    status = 400
    type = "invalid_request_error"


class ConfigError(LoraplexError):
    """A configuration value (CLI flag, env var, Config field) is invalid."""

    status = 500
    type = "configuration_error"


class ModelLoadError(LoraplexError):
    """The base model cannot be found, read or is of an unsupported architecture."""

    status = 503
    type = "model_load_error"


class AdapterError(LoraplexError):
    """An adapter cannot be loaded or is invalid. The message names the adapter and the cause."""

    status = 422
    type = "invalid_request_error"
    code = "adapter_invalid"

    def __init__(self, adapter: str, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(f"adapter {adapter!r}: {message}", param=param, code=code)
        self.adapter = adapter


class AdapterNotFoundError(AdapterError):
    status = 404
    code = "model_not_found"


class AdapterFormatError(AdapterError):
    """Missing files, pickle-only weights, unparsable config or tensors."""


class AdapterShapeError(AdapterError):
    """A tensor does not fit the base model (or the rank is over the configured maximum)."""


class UnsupportedAdapterError(AdapterError):
    """A PEFT feature we do not serve: DoRA, lora bias, modules_to_save, embedding/lm_head LoRA..."""
