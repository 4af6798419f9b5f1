"""Errors that reach clients as Matrix standard error responses.

Every failure a client can cause is a :class:`MatrixError`: it carries the
``errcode`` and HTTP status the spec prescribes, and the HTTP layer turns it into
``{"errcode": ..., "error": ...}``. Anything else that escapes a handler is a bug
and becomes ``500 M_UNKNOWN`` (and a log line with the traceback).

The tree::

    MatrixError                     (errcode, status, message, extra fields)
     ├── BadJson                    400 M_BAD_JSON
     ├── NotJson                    400 M_NOT_JSON
     ├── InvalidParam               400 M_INVALID_PARAM
     │    └── StorageRejected       400 M_INVALID_PARAM (a value the database cannot store)
     ├── MissingParam               400 M_MISSING_PARAM
     ├── Forbidden                  403 M_FORBIDDEN
     ├── NotFound                   404 M_NOT_FOUND
     ├── Unrecognized               404/405 M_UNRECOGNIZED
     ├── MissingToken               401 M_MISSING_TOKEN
     ├── UnknownToken               401 M_UNKNOWN_TOKEN
     ├── TooLarge                   413 M_TOO_LARGE
     ├── LimitExceeded              429 M_LIMIT_EXCEEDED
     └── InteractiveAuthRequired    401 (UIA flows body, optional errcode)

Core (pure) code raises :class:`AuthError` when an event breaks the room's
authorisation rules; services translate it into ``403 M_FORBIDDEN`` with the
rule's reason.
"""

from __future__ import annotations

from typing import Any


class MatrixError(Exception):
    """A client-visible error: ``status`` HTTP code, ``errcode`` and a message."""

    status: int = 400
    errcode: str = "M_UNKNOWN"
    # Set when the request's body was left unread: the answer closes the connection.
    close_connection: bool = False

    def __init__(
        self,
        message: str,
        *,
        errcode: str | None = None,
        status: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        if errcode is not None:
            self.errcode = errcode
        if status is not None:
            self.status = status
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errcode": self.errcode, "error": self.message}
        body.update(self.extra)
        return body


class BadJson(MatrixError):
    errcode = "M_BAD_JSON"


class NotJson(MatrixError):
    errcode = "M_NOT_JSON"


class InvalidParam(MatrixError):
    errcode = "M_INVALID_PARAM"


class MissingParam(MatrixError):
    errcode = "M_MISSING_PARAM"


class Forbidden(MatrixError):
    status = 403
    errcode = "M_FORBIDDEN"


class NotFound(MatrixError):
    status = 404
    errcode = "M_NOT_FOUND"


class Unrecognized(MatrixError):
    status = 404
    errcode = "M_UNRECOGNIZED"


class MissingToken(MatrixError):
    status = 401
    errcode = "M_MISSING_TOKEN"


class UnknownToken(MatrixError):
    status = 401
    errcode = "M_UNKNOWN_TOKEN"


class TooLarge(MatrixError):
    status = 413
    errcode = "M_TOO_LARGE"


class LimitExceeded(MatrixError):
    status = 429
    errcode = "M_LIMIT_EXCEEDED"


class InteractiveAuthRequired(MatrixError):
    """401 carrying the user-interactive-auth state (flows, session, completed).

    ``errcode`` is only present when a stage was attempted and failed, as the
    spec's UIA section describes.
    """

    status = 401

    def __init__(self, body: dict[str, Any], message: str | None = None, errcode: str | None = None):
        super().__init__(message or "Additional authentication is required")
        self.body = body
        self.failed_errcode = errcode

    def to_dict(self) -> dict[str, Any]:
        body = dict(self.body)
        if self.failed_errcode is not None:
            body["errcode"] = self.failed_errcode
            body["error"] = self.message
        return body


class AuthError(Exception):
    """An event is not allowed by the room version's authorisation rules."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(Exception):
    """The configuration is unusable; the message names the key and the problem."""


class StorageUnavailable(MatrixError):
    """The database could not be reached; the client should retry later."""

    status = 503
    errcode = "M_UNKNOWN"


class StorageRejected(InvalidParam):
    """The database refused a value from the request: text with a NUL character
    (PostgreSQL), a number beyond a 64-bit integer, a value too long for an index.
    Nothing of the transaction is kept; the request is at fault, not the server."""
