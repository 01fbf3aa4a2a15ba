"""The app factory: composes the protocols over one dataplane and repository, the edge middleware, the
error map, health and metrics routes, and the lifecycle (warm-up behind /readyz, drain on shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import orjson
from fastapi import FastAPI, Response
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from exitserve import __version__
from exitserve.errors import Unavailable
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.protocols import admin, docs, feedback, openai, v1, v2
from exitserve.service.protocols.edge import EdgeMiddleware
from exitserve.service.protocols.errors import install_error_handlers
from exitserve.service.protocols.hot_routes import HotRoutes
from exitserve.service.serving.dataplane import Dataplane
from exitserve.service.serving.generation.repository import GenerationRepository, split_bundles
from exitserve.service.serving.repository import ModelRepository
from exitserve.service.settings import MIN_KEY_CHARS, Settings

log = logging.getLogger("exitserve.http")


def _custom_openapi(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request_schema = v1.PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(request_schema.pop("$defs", {}))
    components["PredictRequest"] = request_schema
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None, repository: ModelRepository | None = None) -> FastAPI:
    """Build the app. Bundles load (and fail loudly) here; warm-up runs after start-up, behind /readyz."""
    settings = settings or Settings()
    for name in settings.short_keys():
        log.warning(f"{name} is shorter than {MIN_KEY_CHARS} characters: easy to guess; use a long random key "
                    "(python -c 'import secrets; print(secrets.token_urlsafe(32))')", extra={"setting": name})
    metrics = repository.metrics if repository else Metrics()
    # Language models (text-generation bundles) have their own repository and OpenAI routes.
    classifier_paths, generation_paths = split_bundles(settings.bundles) if repository is None else ([], [])
    if repository is None:
        repository = ModelRepository(settings, metrics)
        repository.load(classifier_paths)
    generation = GenerationRepository(settings, metrics.registry, max_running=min(settings.max_batch_size, 64),
                                      queue_limit=settings.queue_limit, ready_gauge=metrics.model_ready)
    generation.load(generation_paths)
    dataplane = Dataplane(repository, settings)
    warmup: dict[str, asyncio.Task | None] = {"task": None}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        def warm_up() -> None:
            repository.start()
            generation.start()

        warmup["task"] = asyncio.create_task(asyncio.to_thread(warm_up))
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
        docs_url=None,  # Swagger UI from the installed package (protocols/docs.py), not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.repository = repository
    app.state.generation = generation
    app.state.metrics = metrics
    install_error_handlers(app)
    v1_router, v1_predict = v1.build_router(dataplane)
    v2_router, v2_infer = v2.build_router(dataplane)
    app.include_router(v1_router)
    app.include_router(v2_router)
    app.include_router(admin.build_router(repository))
    app.include_router(feedback.build_router(repository))
    app.include_router(openai.build_router(generation, settings.default_delta, settings.default_policy))
    app.include_router(docs.build_router(app.openapi_url or "/openapi.json", app.title))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        return Response(orjson.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/readyz", tags=["health"])
    async def readyz() -> Response:
        task = warmup["task"]
        if task is not None and task.done() and task.exception() is not None:
            raise Unavailable(f"warm-up failed: {task.exception()}")
        ready = (repository.ready or not repository.models) and generation.ready and bool(
            repository.models or generation.models)
        models = {name: m.ready for name, m in (*repository.models.items(), *generation.models.items())}
        body: dict[str, object] = {"ready": ready, "models": models}
        # A shared decision store that is down does not stop inference (only feedback): shown, not failed.
        stores = {name: m.monitor.store_state for name, m in repository.models.items()}
        if any(state != "memory" for state in stores.values()):
            body["decision_store"] = stores
        return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")

    @app.get("/metrics", tags=["health"])
    async def prometheus_metrics() -> Response:
        for name, model in repository.models.items():
            metrics.queue_depth.labels(name).set(model.batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    started = int(time.time())  # OpenAI's `created` of every model: when this server loaded it

    @app.get("/v1/models", tags=["v1"])
    async def list_models() -> Response:
        # exitserve's own listing of the classifiers ("models") and OpenAI's shape of every served model,
        # classifiers and language models alike ("object": "list", "data"), so `client.models.list()` works.
        names = [*repository.models, *generation.models]
        return Response(orjson.dumps({
            "object": "list",
            "data": [{"id": name, "object": "model", "created": started, "owned_by": "exitserve"} for name in names],
            "models": [
                {"name": n, "version": m.manifest.version, "exits": m.manifest.num_exits, "ready": m.ready,
                 "compute_fractions": m.compute_fractions.tolist(), "labels": m.manifest.labels, **m.trust()}
                for n, m in repository.models.items()
            ],
        }), media_type="application/json")

    app.openapi = lambda: _custom_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(HotRoutes, v1_predict=v1_predict, v2_infer=v2_infer)  # inside the edge: ids, limits and metrics still apply
    app.add_middleware(EdgeMiddleware, settings=settings, metrics=metrics, repository=repository)
    return app
