"""Admin routes: hot reload of a model, and the SIGHUP handler that reloads every model.

Admin routes change what the server answers, so they are never open and have their own key:
EXITSERVE_ADMIN_API_KEY (the edge middleware asks for it, 401; the inference key does not open them).
With no admin key configured they are refused with 403 (loopback is no proof of trust behind a local
reverse proxy). A reload path must lie under one of the bundle roots (EXITSERVE_BUNDLE_ROOTS, by
default the directories holding the bundles served at start-up); any other path is refused with the
same 403 whether it exists or not, so the errors tell nothing about the server's file system.
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
from exitserve.service.monitoring.feedback_log import FeedbackLog
from exitserve.service.protocols.routes import ADMIN_RELOAD
from exitserve.service.serving.repository import ModelRepository

log = logging.getLogger("exitserve.admin")


def build_router(repository: ModelRepository) -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.post(ADMIN_RELOAD.path,
                 summary="Load the model's bundle again (or the one at body.path), warm it up, swap it in")
    async def reload(model: str, request: Request) -> Response:
        if not repository.settings.admin_api_key:
            raise Forbidden("admin routes are disabled: set EXITSERVE_ADMIN_API_KEY to enable them")
        repository.get(model)  # 404 before reading the body
        path = await _requested_path(request)
        if path is not None:
            path = _within_roots(path, repository.settings.reload_roots())
        started = time.perf_counter()
        try:
            # Building and warming a model takes a while: off the event loop, which keeps serving.
            served = await asyncio.to_thread(repository.reload, model, path)
        except BadBundle as exc:
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


def _within_roots(path: Path, roots: list[Path]) -> Path:
    """The resolved path when it lies under a configured bundle root, else Forbidden (same answer
    whether or not it exists: symlinks and `..` are resolved first, so neither escapes a root)."""
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise Forbidden("path: reloads are allowed only from the configured bundle roots "
                        "(EXITSERVE_BUNDLE_ROOTS)")
    return resolved


@contextlib.contextmanager
def sighup_reloads(repository: ModelRepository) -> Iterator[None]:
    """While active, SIGHUP reloads every model from its directory (failures are logged, old models kept).

    Enter it on the serving event loop in the main thread; elsewhere (test clients) it does nothing."""
    loop = asyncio.get_running_loop()
    # A storm of signals coalesces: while a reload runs, further signals ask for one more run after it
    # (it sees every change made before it starts), never for one run per signal.
    state: dict[str, object] = {"running": None, "again": False}

    def start() -> None:
        future = asyncio.ensure_future(asyncio.to_thread(repository.reload_all))
        state["running"] = future  # also keeps a reference until done, or the task may be collected mid-run
        future.add_done_callback(finished)

    def finished(_: asyncio.Future) -> None:
        state["running"] = None
        if state["again"]:
            state["again"] = False
            start()

    def on_sighup() -> None:
        FeedbackLog.reopen_all()  # logrotate's postrotate sends SIGHUP: write to the new file
        if state["running"] is not None:
            state["again"] = True
            log.info("SIGHUP: a reload is under way; one more will follow it")
            return
        log.info("SIGHUP: reloading every model")
        start()

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
