"""Errors a client sees, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` and an HTTP status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server answers with `status` and OpenAI's error body; the message is safe to show."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # sent with the answer (Retry-After on a 429)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def server_error(message: str = "the server failed to handle this request; see its log") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
