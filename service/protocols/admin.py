"""Admin routes: hot reload of a model, and the SIGHUP handler that reloads every model.

Admin routes change what the server answers, so they are never open: with EXITSERVE_API_KEY set the
edge middleware asks for the key (401) like every non-health route; with no key configured they are
refused with 403 (loopback is no proof of trust behind a local reverse proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
from fastapi import APIRouter, Request, Response

from exitserve.errors import BadBundle, Forbidden, InvalidInput
from exitserve.models.bundle import BundleError
from exitserve.service.serving.repository import ModelRepository

log = logging.getLogger("exitserve.admin")


def build_router(repository: ModelRepository) -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.post("/admin/models/{model}/reload",
                 summary="Load the model's bundle again (or the one at body.path), warm it up, swap it in")
    async def reload(model: str, request: Request) -> Response:
        if not repository.settings.api_key:
            raise Forbidden("admin routes are disabled: set EXITSERVE_API_KEY to enable them")
        repository.get(model)  # 404 before reading the body
        path = await _requested_path(request)
        started = time.perf_counter()
        try:
            # Building and warming a model takes a while: off the event loop, which keeps serving.
            served = await asyncio.to_thread(repository.reload, model, path)
        except BundleError as exc:
            raise BadBundle(f"reload refused, the old model keeps serving: {exc}") from None
        body = {"model": served.name, "version": served.manifest.version, "path": str(repository.paths[model]),
                "seconds": round(time.perf_counter() - started, 3)}
        return Response(orjson.dumps(body), media_type="application/json")

    return router


async def _requested_path(request: Request) -> Path | None:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: invalid JSON ({exc})") from None
    if not isinstance(payload, dict) or set(payload) - {"path"}:
        raise InvalidInput('body: expected {"path": "<bundle directory>"} or no body')
    path = payload.get("path")
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise InvalidInput("path: must be a non-empty string")
    return Path(path)


@contextlib.contextmanager
def sighup_reloads(repository: ModelRepository) -> Iterator[None]:
    """While active, SIGHUP reloads every model from its directory (failures are logged, old models kept).

    Enter it on the serving event loop in the main thread; elsewhere (test clients) it does nothing."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future] = set()

    def on_sighup() -> None:
        log.info("SIGHUP: reloading every model")
        future = asyncio.ensure_future(asyncio.to_thread(repository.reload_all))
        pending.add(future)  # keep a reference until done, or the task may be collected mid-run
        future.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # not the main thread / no SIGHUP
        installed = False
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)
