"""OpenAI's embeddings API: ``POST /v1/embeddings`` and ``GET /v1/models``.

Texts longer than the model's ``max_length`` are truncated, as the rest of lm2vec does.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..outputs import Precision, postprocess
from .errors import APIError, parse
from .service import Service, json_response


class EmbeddingRequest(BaseModel):
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None
    prompt_name: StrictStr | None = None  # lm2vec: a named instruction saved with the model
    precision: Precision = "float32"  # lm2vec: int8, uint8, binary, ubinary as sentence-transformers


def add_routes(app: FastAPI, service: Service, model_name: str, normalize: bool) -> None:
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "lm2vec"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/embeddings")
    async def embeddings(http: Request) -> Response:
        request = await parse(http, EmbeddingRequest)
        if request.model != model_name:
            message = f"unknown model {request.model!r}; this server serves {model_name!r}"
            raise APIError(404, message, "model", "model_not_found")
        service.check_dimensions(request.dimensions)
        items = [request.input] if isinstance(request.input, str) else request.input
        if items and isinstance(items[0], int):  # one list of token ids
            items = [items]
        if request.precision in ("int8", "uint8") and len(items) < 2:
            message = f"precision {request.precision} needs at least two inputs: its ranges come from the request"
            raise APIError(422, message, "precision")
        vectors, tokens = await service.embed_input(http, items, request.prompt_name)

        def body() -> dict:
            rows = np.asarray(postprocess(vectors, request.dimensions, normalize, request.precision))
            data = [
                {"object": "embedding", "index": i, "embedding": encode_row(row, request.encoding_format)}
                for i, row in enumerate(rows)
            ]
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return {"object": "list", "data": data, "model": model_name, "usage": usage}

        return await json_response(body)


def encode_row(row: np.ndarray, encoding_format: str) -> list | str:
    """A float or integer list, or base64 of the row's bytes (float32 little-endian, or the int8/uint8 bytes)."""
    if encoding_format == "base64":
        return base64.b64encode(row.astype(row.dtype.newbyteorder("<"), copy=False).tobytes()).decode()
    return row.tolist()
