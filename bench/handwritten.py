"""The hand-written server bench/batching.py compares against: what an engineer writes without a serving
framework. uvicorn (httptools, uvloop) and a bare ASGI function: parse the JSON, run the MLP on the request at
once on the event loop's thread (no batching, no queue, no thread hand-off: the least a lone request can pay),
answer the JSON. Same model, same input and output as bench/batching_service.py.

    python -m uvicorn handwritten:app --port 3001 --no-access-log   (from bench/)
"""

from __future__ import annotations

import msgspec
import numpy as np
import torch

from batching_service import build_mlp

torch.set_num_threads(1)
model = build_mlp()


class Body(msgspec.Struct):
    x: list[list[float]]


decode = msgspec.json.Decoder(Body).decode
encode = msgspec.json.Encoder().encode
HEADERS = [(b"content-type", b"application/json")]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    try:
        x = np.asarray(decode(body).x, dtype=np.float32)
    except (msgspec.DecodeError, ValueError) as exc:
        out, status = encode({"error": str(exc)}), 422
    else:
        with torch.inference_mode():
            out, status = encode(model(torch.from_numpy(x)).numpy().tolist()), 200
    await send({"type": "http.response.start", "status": status,
                "headers": HEADERS + [(b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
