"""text-embeddings-inference's API beside OpenAI's, so clients written for TEI work unchanged:
``POST /embed`` (``inputs``, ``normalize``, ``truncate``, ``prompt_name``, ``dimensions``) answers a list of
vectors; ``GET /info`` describes the model and the limits. Errors come in TEI's shape on these routes
(``{"error", "error_type"}``, :mod:`.errors`), as its clients read them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from .. import __version__
from ..outputs import postprocess
from .errors import parse
from .service import Service, json_response

PATHS = frozenset({"/embed", "/info"})


class EmbedRequest(BaseModel):
    inputs: StrictStr | list[StrictStr] | list[list[StrictInt]]
    normalize: StrictBool = True
    truncate: StrictBool = False  # TEI's default: a text over max_length is an error, not cut
    truncation_direction: Literal["Right", "right"] = "Right"
    prompt_name: StrictStr | None = None
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None


def add_routes(app: FastAPI, service: Service, model_name: str, max_batch_tokens: int) -> None:
    encoder = service.encoder

    @app.get("/info")  # the routes are PATHS
    async def info() -> dict:
        return {
            "model_id": model_name,
            "model_sha": None,
            "model_dtype": encoder.dtype,
            "model_type": {"embedding": {"pooling": encoder.pooling.value}},
            "max_input_length": encoder.max_length,
            "max_batch_tokens": max_batch_tokens,
            "max_client_batch_size": service.limits.max_inputs,
            "auto_truncate": False,
            "tokenization_workers": 1,
            "version": __version__,
        }

    @app.post("/embed")
    async def embed(http: Request) -> Response:
        request = await parse(http, EmbedRequest)
        service.check_dimensions(request.dimensions)
        items = [request.inputs] if isinstance(request.inputs, str) else request.inputs
        vectors, _ = await service.embed_input(http, items, request.prompt_name, request.truncate)
        return await json_response(lambda: postprocess(vectors, request.dimensions, request.normalize).tolist())
