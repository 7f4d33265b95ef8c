"""BentoML's ASGI example: a FastAPI app mounted beside the service, reaching it through
bentoml.get_current_service(); plus a GET API. Ported from BentoML 1.4 by changing the import line only."""

from __future__ import annotations

from fastapi import FastAPI

import bento_like as bentoml

app = FastAPI()


@app.get("/metadata")
def metadata() -> dict:
    return {"name": "Greeter", "version": "1.0.0"}


@app.post("/custom-greet")
async def custom_greet(name: str) -> dict:
    service = bentoml.get_current_service()
    return {"message": service.greet(name=name)}


@bentoml.asgi_app(app, path="/v1")
@bentoml.service(resources={"cpu": "100m"})
class Greeter:
    @bentoml.api
    def greet(self, name: str) -> str:
        return f"Hello, {name}!"

    @bentoml.api(route="/health-info", method="GET")
    def health_info(self, verbose: bool = False) -> dict:
        return {"ok": True, **({"detail": "all good"} if verbose else {})}
