"""The repository API over HTTP: ``POST /v2/repository/index``, ``.../models/{name}/load`` and ``.../unload`` (the
Open Inference Protocol's model repository extension, with Triton's semantics), behind the admin bearer token."""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import HTTPError
from .swap_checks import LoadFailed

if TYPE_CHECKING:
    from .app import ServerState
    from .repository import ModelRepository


def repository_routes(state: ServerState, repository: ModelRepository) -> list[Route]:
    """``POST /v2/repository/index``, ``.../models/{name}/load`` and ``.../unload`` (the Open Inference
    Protocol's model repository extension, with Triton's semantics), each behind the admin bearer token."""
    token = state.tuning.updates.admin_token.encode()

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
            raise HTTPError(401, "the repository API needs the admin token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": 'Bearer realm="bento_like repository"'})

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise HTTPError(400, f"the request body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return value

    async def index(request: Request) -> Response:
        authorize(request)
        ready = (await body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise HTTPError(400, f"field 'ready' must be true or false, got {ready!r}", field="$.ready")
        return JSONResponse(repository.index(ready_only=ready))

    async def operate(request: Request, kind: str) -> Response:
        authorize(request)
        payload = await body(request)
        parameters = payload.get("parameters", {})
        if not isinstance(parameters, dict):
            raise HTTPError(400, "field 'parameters' must be an object", field="$.parameters")
        version, quality = parameters.get("version"), parameters.get("quality")
        config = parameters.get("config")  # tritonclient's load_model(config=...) sends a JSON string
        if isinstance(config, str):
            try:
                config = json.loads(config)
            except ValueError:
                raise HTTPError(400, "parameters.config is not JSON", field="$.parameters.config") from None
        if isinstance(config, dict):
            version = config.get("version", version)
            quality = config.get("quality", quality)
        try:
            answer = await repository.request(kind, request.path_params["name"], version, quality)
        except LoadFailed as exc:
            raise HTTPError(exc.status, str(exc)) from None
        return JSONResponse(answer)

    async def load(request: Request) -> Response:
        return await operate(request, "load")

    async def unload(request: Request) -> Response:
        return await operate(request, "unload")

    return [
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
    ]
