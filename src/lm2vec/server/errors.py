"""Every error the server gives, in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``, or on
text-embeddings-inference's routes in TEI's: ``{"error": message, "error_type": "Validation" | "Overloaded" | ...}``.

Bodies are parsed here rather than by FastAPI, so that a body that is not UTF-8, not JSON, nested too deeply or
holds numbers Python will not read gets the same shape (400) as a wrong field (422), not ``{"detail": ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

Schema = TypeVar("Schema", bound=BaseModel)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(message: str, param: str | None = None, code: str | None = None, kind: str | None = None) -> dict:
    kind = kind or "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError, tei: bool = False) -> JSONResponse:
    """The error in OpenAI's shape, or in TEI's (``tei``), which its clients read."""
    if tei:
        return JSONResponse(
            {"error": err.message, "error_type": tei_error_type(err.status)}, err.status, headers=err.headers
        )
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return JSONResponse(error_body(err.message, err.param, err.code, kind), err.status, headers=err.headers)


def tei_error_type(status: int) -> str:
    """TEI's ``ErrorType`` for an HTTP status: too busy (429) or draining (503), a model failure, or the request."""
    return {429: "Overloaded", 503: "Unhealthy"}.get(status, "Backend" if status >= 500 else "Validation")


async def parse(request: Request, schema: type[Schema]) -> Schema:
    """The request body as ``schema``, or an :class:`APIError` saying what is wrong with it."""
    body = await request.body()
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        message = f"the body is not UTF-8 ({err.reason} at byte {err.start})"
        raise APIError(400, message, code="invalid_encoding") from None
    except RecursionError:
        raise APIError(400, "malformed JSON: nested too deeply", code="json_invalid") from None
    except ValueError as err:  # JSONDecodeError, and integers longer than Python reads
        raise APIError(400, f"malformed JSON: {err}", code="json_invalid") from None
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or None
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        raise APIError(422, message, param=where) from None


def add_handlers(app: FastAPI, tei_paths: frozenset[str] = frozenset()) -> None:
    """OpenAI's shape (TEI's on ``tei_paths``) for our errors, unknown routes and methods (404/405), and anything
    unexpected (500)."""

    def respond(request: Request, err: APIError) -> JSONResponse:
        return error_response(err, request.url.path in tei_paths)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return respond(request, err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return respond(request, APIError(err.status_code, str(err.detail), headers=err.headers))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return respond(request, APIError(500, f"internal error: {type(err).__name__}: {err}"))
