"""FastAPI app factory: routes, errors as {"error": ...}, request ids, API key, metrics, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exitserve import __version__
from exitserve.service.monitoring.decisions import REQUEST_ID
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.protocols import admin
from exitserve.service.protocols import feedback as api_feedback
from exitserve.service.protocols import openai as api_openai
from exitserve.service.protocols import v1 as api_v1
from exitserve.service.protocols import v2 as api_v2
from exitserve.service.serving.dataplane import Dataplane, ServiceError
from exitserve.service.serving.generation.repository import GenerationRepository, split_bundles
from exitserve.service.serving.repository import ModelRepository, UnknownModel
from exitserve.service.settings import Settings

log = logging.getLogger("exitserve.http")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/", "/docs", "/openapi.json")


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json", headers=headers)


def _inference_route(path: str) -> tuple[str, str] | None:
    """(protocol, model) for inference paths, else None."""
    parts = path.strip("/").split("/")
    if len(parts) >= 4 and parts[1] == "models" and parts[0] in ("v1", "v2") and parts[-1] in ("predict", "infer"):
        return parts[0], parts[2]
    return None


class EdgeMiddleware:
    """Pure ASGI (cheaper than BaseHTTPMiddleware): request id, API key, body limit, request metrics, logs."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, repository: ModelRepository):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.repository = repository
        self.api_key = settings.api_key.encode() if settings.api_key else None

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        supplied = headers.get(b"x-api-key")
        if supplied is None:
            auth = headers.get(b"authorization", b"")
            supplied = auth[7:] if auth[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(supplied, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)  # the dataplane records decisions under it (labelled feedback)
        path = scope["path"]
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        response: Response | None = None
        if self.api_key and not path.startswith(OPEN_PATHS) and not self._authorised(headers):
            response = error_response("missing or wrong API key", 401, {"WWW-Authenticate": "Bearer"})
        else:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
                response = error_response(f"body of {int(length)} bytes exceeds the limit of {self.settings.max_body_bytes}", 413)
        if response is not None:
            await response(scope, receive, send_with_id)
        else:
            await self.app(scope, self._limited(receive), send_with_id)

        route = _inference_route(path)
        if route is not None:
            protocol, model = route
            label = model if model in self.repository.models else "unknown"
            status = status_holder["status"]
            self.metrics.requests.labels(label, protocol, str(status)).inc()
            if status < 400:
                self.metrics.request_duration.labels(label).observe(time.perf_counter() - started)
            level = logging.INFO if status < 500 else logging.ERROR
            log.log(level, "request", extra={"request_id": request_id, "model": model, "protocol": protocol,
                                              "status": status, "seconds": round(time.perf_counter() - started, 6)})

    def _limited(self, receive: Receive) -> Receive:
        limit = self.settings.max_body_bytes
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ServiceError(f"body exceeds the limit of {limit} bytes", status=413)
            return message

        return wrapped


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> Response:
        return error_response(str(exc), exc.status, exc.headers or None)

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, exc: UnknownModel) -> Response:
        return error_response(str(exc), 404)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(f"{where}: {first.get('msg')}", 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(str(exc.detail), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up mid-body: no one to answer and not a server fault, so neither an ERROR
        # log nor a 5xx in the request metrics (499, nginx's "client closed request").
        log.info("client disconnected before sending its whole body",
                 extra={"request_id": getattr(request.state, "request_id", None)})
        return error_response("client closed the request", 499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"request_id": getattr(request.state, "request_id", None)})
        return error_response("internal server error", 500)


def _custom_openapi(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request_schema = api_v1.PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(request_schema.pop("$defs", {}))
    components["PredictRequest"] = request_schema
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None, repository: ModelRepository | None = None) -> FastAPI:
    """Build the app. Bundles load (and fail loudly) here; warm-up runs after start-up, behind /readyz."""
    settings = settings or Settings()
    metrics = repository.metrics if repository else Metrics()
    # Language models (text-generation bundles) have their own repository and OpenAI routes.
    classifier_paths, generation_paths = split_bundles(settings.bundles) if repository is None else ([], [])
    if repository is None:
        repository = ModelRepository(settings, metrics)
        repository.load(classifier_paths)
    generation = GenerationRepository(settings, metrics.registry, max_running=min(settings.max_batch_size, 64),
                                      queue_limit=settings.queue_limit)
    generation.load(generation_paths)
    dataplane = Dataplane(repository, settings)
    warmup: dict[str, asyncio.Task | None] = {"task": None}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        warmup["task"] = asyncio.create_task(asyncio.to_thread(lambda: (repository.start(), generation.start())))
        with admin.sighup_reloads(repository):  # SIGHUP reloads every model from its bundle directory
            yield
        if warmup["task"] is not None:
            with contextlib.suppress(Exception):
                await warmup["task"]
        drained = await asyncio.to_thread(repository.stop, settings.drain_timeout_s)
        drained = await asyncio.to_thread(generation.stop, settings.drain_timeout_s) and drained
        log.info("shutdown", extra={"drained": drained})

    app = FastAPI(
        title="exitserve",
        version=__version__,
        description="Multi-exit network serving: every sample stops at the first exit whose estimated accuracy reaches delta.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.repository = repository
    app.state.generation = generation
    app.state.metrics = metrics
    _install_error_handlers(app)
    app.include_router(api_v1.build_router(dataplane))
    app.include_router(api_v2.build_router(dataplane))
    app.include_router(admin.build_router(repository))
    app.include_router(api_feedback.build_router(repository))
    app.include_router(api_openai.build_router(generation, settings.default_delta, settings.default_policy))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        task = warmup["task"]
        if task is not None and task.done() and task.exception() is not None:
            return error_response(f"warm-up failed: {task.exception()}", 503)
        ready = (repository.ready or not repository.models) and generation.ready and bool(
            repository.models or generation.models)
        models = {name: m.ready for name, m in (*repository.models.items(), *generation.models.items())}
        return Response(orjson.dumps({"ready": ready, "models": models}), status_code=200 if ready else 503,
                        media_type="application/json")

    @app.get("/metrics", tags=["health"])
    async def prometheus_metrics() -> Response:
        for name, model in repository.models.items():
            metrics.queue_depth.labels(name).set(model.batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["v1"])
    async def list_models() -> Response:
        return Response(orjson.dumps({"models": [
            {"name": n, "version": m.manifest.version, "exits": m.manifest.num_exits, "ready": m.ready,
             "compute_fractions": m.compute_fractions.tolist(), "labels": m.manifest.labels}
            for n, m in repository.models.items()
        ]}), media_type="application/json")

    app.openapi = lambda: _custom_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics, repository=repository)
    return app
