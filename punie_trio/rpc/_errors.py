"""JSON-RPC 2.0 error codes and the exception that carries one.

The codes are the ones DESIGN.md fixes for punie-trio: the five standard JSON-RPC codes plus
the ACP/LSP ones for cancellation, authentication and missing resources.
"""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
REQUEST_CANCELLED = -32800
AUTH_REQUIRED = -32000
RESOURCE_NOT_FOUND = -32002

ERROR_NAMES: dict[int, str] = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal_error",
    REQUEST_CANCELLED: "request_cancelled",
    AUTH_REQUIRED: "auth_required",
    RESOURCE_NOT_FOUND: "resource_not_found",
}


#: The longest error message sent (characters): the schema's ``Error.message`` is "a
#: concise single sentence", and messages name the bad value they refuse, which a client
#: may send a megabyte of (a cursor, a cwd, a method name). Longer than any path
#: (``PATH_MAX`` is 4096 bytes), so a message naming a real one is never cut.
MAX_ERROR_MESSAGE_CHARS = 4200


def concise_message(message: str) -> str:
    """``message``, cut to :data:`MAX_ERROR_MESSAGE_CHARS` with a note of its length."""
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    note = f"... (cut: the message had {len(message)} characters)"
    return message[: MAX_ERROR_MESSAGE_CHARS - len(note)] + note


class RpcError(Exception):
    """A JSON-RPC error: raised by handlers to answer with it, raised by ``Peer.request``
    when the other side answered with one.

    ``data`` must be JSON-serialisable; it is sent as the error object's ``data`` member.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            obj["data"] = self.data
        return obj

    @classmethod
    def invalid_params(cls, message: str) -> RpcError:
        return cls(INVALID_PARAMS, message)

    @classmethod
    def not_found(cls, message: str) -> RpcError:
        return cls(RESOURCE_NOT_FOUND, message)


class PeerClosed(Exception):
    """The connection ended before the other side answered a request."""
