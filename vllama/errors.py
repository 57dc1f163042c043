"""Error types that leave the daemon in the OpenAI error shape.

Every error a client can see is a `VllamaError`: it carries the HTTP status and renders as
`{"error": {"message", "type", "param", "code"}}`, the envelope the `openai` client parses.
"""

from __future__ import annotations

from typing import Any


class VllamaError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.code, self.param)


class BadRequest(VllamaError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "bad_request"


class Unauthorized(VllamaError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(VllamaError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ModelNotAllowed(ModelNotFound):
    """A model name this daemon could start but its settings do not allow (VLLAMA_ALLOW_MODELS)."""

    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class NotFound(VllamaError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Conflict(VllamaError):
    status_code = 409
    error_type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(VllamaError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class UpstreamError(VllamaError):
    """The model's vLLM process failed mid-request (crashed, reset the connection)."""

    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(VllamaError):
    """The model's vLLM process did not start answering within `VLLAMA_RESPONSE_TIMEOUT`."""

    status_code = 504
    error_type = "upstream_timeout"
    code = "upstream_timeout"


class ModelUnavailable(VllamaError):
    """The model could not be made ready: failed start, wake failure, timeout, no memory."""

    status_code = 503
    error_type = "model_unavailable"
    code = "model_unavailable"


class NoCapacity(ModelUnavailable):
    code = "insufficient_memory"


class AdapterUnavailable(ModelUnavailable):
    """A LoRA adapter could not be loaded (wrong path, rank above the limit, refused by vLLM, no free slot);
    its base model is not affected."""

    code = "adapter_unavailable"


class ConfigError(Exception):
    """models.yaml or settings are invalid; the message names the model, the key and the value."""


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
