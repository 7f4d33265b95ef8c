"""The services bench/overhead.py compares: ours (async and sync tag) and a hand-written Starlette app."""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import bento_like as bl


class Item(msgspec.Struct):
    text: str
    lang: str = "en"


@bl.service(name="overhead")
class Overhead:
    @bl.api(route="/tag")
    async def tag(self, item: Item) -> dict:
        return {"text": item.text, "lang": item.lang}

    @bl.api(route="/tag_sync")
    def tag_sync(self, item: Item) -> dict:
        return {"text": item.text, "lang": item.lang}


class TagInput(msgspec.Struct):
    item: Item


_decoder = msgspec.json.Decoder(TagInput)
_encoder = msgspec.json.Encoder()


async def bare_tag(request: Request) -> Response:
    body = _decoder.decode(await request.body())
    return Response(_encoder.encode({"text": body.item.text, "lang": body.item.lang}), media_type="application/json")


bare_app = Starlette(routes=[Route("/tag", bare_tag, methods=["POST"])])
