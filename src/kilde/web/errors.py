"""JSON error bodies: what was wrong and how to fix it, never personal data."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import orjson
from starlette.responses import Response


class JsonResponse(Response):
    """JSON rendered by orjson (datetimes as ISO 8601)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


class HttpProblem(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fix: str,
        *,
        path: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fix = fix
        self.path = path
        self.extra = extra or {}
        self.headers = headers


def problem_response(problem: HttpProblem) -> JsonResponse:
    body: dict[str, Any] = {
        "success": False,
        "error": problem.code,
        "code": problem.code,  # what Segment's and RudderStack's SDKs read from an error
        "message": problem.message,
        "fix": problem.fix,
    }
    if problem.path:
        body["path"] = problem.path
    body.update(problem.extra)
    return JsonResponse(body, status_code=problem.status, headers=problem.headers)


class RedactExceptionText(logging.Filter):
    """Keep tracebacks in the log but drop exception messages, which may quote request data.

    Starlette re-raises unhandled errors after answering, and uvicorn logs them with the
    exception's text; `ValueError: invalid literal ... 'jane@example.com'` must not reach a log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            kind, _, tb = record.exc_info
            frames = "".join(traceback.format_tb(tb))
            name = kind.__name__ if kind else "Exception"
            record.exc_text = f"Traceback (most recent call last):\n{frames}{name}: (text withheld)"
        return True


# Client libraries that log every request's address at INFO: a receiver's URL can carry a
# token, and a look-up can carry an identifier.
CHATTY_LOGGERS = ("httpx", "httpcore", "urllib3")


def configure_server_logging() -> None:
    """The log of a running server: timestamps, and nothing that could quote personal data
    or secrets (exception texts withheld, request addresses of outgoing calls not logged)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactExceptionText())
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
