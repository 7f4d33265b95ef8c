"""A service using what a BentoML 1.4 user reaches for: request context, Pydantic, enforced constraints, GET APIs,
a mounted ASGI app, readiness and deployment hooks, plain-text streams."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, AsyncGenerator, Iterator

import annotated_types as at
import msgspec
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bento_like as bl

READY_FILE = os.environ.get("PARITY_NOT_READY_FILE", "")
DEPLOY_LOG = os.environ.get("PARITY_DEPLOY_LOG", "")


class Message(BaseModel):
    role: str = Field(pattern="^(user|assistant|system)$")
    content: str = Field(min_length=1)


class Chat(BaseModel):
    messages: list[Message]
    temperature: float = Field(1.0, ge=0, le=2)


class Reply(BaseModel):
    text: str
    tokens: int


async def whoami(request: Request) -> JSONResponse:
    service = bl.get_current_service()
    return JSONResponse({"service": type(service).__name__, "greeting": service.greet(name="asgi")})


extra = Starlette(routes=[Route("/whoami", whoami)])


@bl.mount_asgi_app(extra, path="/extra")
@bl.service(resources={"cpu": "500m", "memory": "256Mi"})
class Parity:
    @bl.on_deployment
    def prepare():  # noqa: N805 - BentoML's deployment hooks take no self
        if DEPLOY_LOG:
            with open(DEPLOY_LOG, "a") as f:
                f.write(f"deployed by {os.getpid()}\n")

    def __is_ready__(self) -> bool:
        return not (READY_FILE and Path(READY_FILE).exists())

    @bl.on_ready
    async def cache_is_warm(self) -> bool:
        if READY_FILE and Path(READY_FILE).with_name("cache-cold").exists():
            raise RuntimeError("the cache is cold")
        return True

    @bl.api
    def echo_context(self, text: str, ctx: bl.Context) -> dict:
        """Echo what the request carried, and answer with a status, a header and a cookie of our own."""
        ctx.state["seen"] = text
        ctx.response.status_code = 201
        ctx.response.headers["X-Echo"] = text.upper()
        ctx.response.set_cookie("session", "s-" + text, httponly=True)
        request = ctx.request
        return {
            "user": request.headers.get("x-user"),
            "cookie": request.cookies.get("flavour"),
            "query": request.query_params.get("lang"),
            "client": request.client.host if request.client else None,
            "state": dict(ctx.state),
        }

    @bl.api
    def chat(self, chat: Chat) -> Reply:
        last = chat.messages[-1].content
        return Reply(text=f"{last} (t={chat.temperature})", tokens=len(last.split()))

    @bl.api
    def sample(
        self,
        prompt: str,
        temperature: float = Field(default=1.0, ge=0.0, le=2.0),
        top_k: Annotated[int, at.Gt(0), at.Le(100)] = 10,
    ) -> dict:
        return {"prompt": prompt, "temperature": temperature, "top_k": top_k}

    @bl.api
    def bounded(self, score: Annotated[float, at.Lt(2)], tags: Annotated[list[str], at.MaxLen(2)] = []) -> float:  # noqa: B006
        return score

    @bl.api(method="GET")
    def greet(self, name: str, times: int = 1, shout: bool = False) -> str:
        text = " ".join([f"hello {name}"] * times)
        return text.upper() if shout else text

    @bl.api
    def tokens(self, n: int) -> Iterator[str]:
        for i in range(n):
            yield f"t{i} "

    @bl.api
    async def atokens(self, n: int, ctx: bl.Context) -> AsyncGenerator[str, None]:
        ctx.response.headers["X-Count"] = str(n)
        for i in range(n):
            yield f"a{i} "

    @bl.api
    def events(self, n: int) -> Iterator[dict]:
        for i in range(n):
            yield {"i": i}


class Point(msgspec.Struct):
    x: Annotated[float, msgspec.Meta(ge=0)]
