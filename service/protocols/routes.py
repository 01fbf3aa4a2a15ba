"""The routes that carry a model's work, in one table: the FastAPI routers register these paths, the
edge reads from it which protocol and model a request is for (admission, body limits, request
metrics), and the hot routes which inference POSTs skip FastAPI's router. A route added here is
known to all three; one added elsewhere is an ordinary route (no model admission, no model metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Protocol = Literal["v1", "v2", "feedback", "admin", "openai"]


@dataclass(frozen=True)
class ModelRoute:
    protocol: Protocol
    path: str  # as the router registers it: {model} and {version} are path parameters
    hot: bool = False  # an inference POST that HotRoutes serves past FastAPI's router

    @property
    def parts(self) -> list[str]:
        return self.path.split("/")


V1_PREDICT = ModelRoute("v1", "/v1/models/{model}/predict", hot=True)
V2_INFER = ModelRoute("v2", "/v2/models/{model}/infer", hot=True)
V2_VERSION_INFER = ModelRoute("v2", "/v2/models/{model}/versions/{version}/infer", hot=True)
V1_FEEDBACK = ModelRoute("feedback", "/v1/models/{model}/feedback")
ADMIN_RELOAD = ModelRoute("admin", "/admin/models/{model}/reload")
OPENAI_COMPLETIONS = ModelRoute("openai", "/v1/completions")  # the model is named in the body
OPENAI_CHAT = ModelRoute("openai", "/v1/chat/completions")

ROUTES: tuple[ModelRoute, ...] = (V1_PREDICT, V2_INFER, V2_VERSION_INFER, V1_FEEDBACK, ADMIN_RELOAD,
                                  OPENAI_COMPLETIONS, OPENAI_CHAT)
OPENAI_PATHS: tuple[str, ...] = tuple(r.path for r in ROUTES if r.protocol == "openai")


@dataclass(frozen=True)
class Match:
    route: ModelRoute
    params: dict[str, str]  # model (empty for the OpenAI routes until the body names it), version

    @property
    def model(self) -> str:
        return self.params.get("model", "")


# Routes by segment count: a request's path is split once and compared with the few routes of its length.
_BY_LENGTH: dict[int, list[ModelRoute]] = {}
for _route in ROUTES:
    _BY_LENGTH.setdefault(len(_route.parts), []).append(_route)


def match(path: str) -> Match | None:
    """The model route a path is for, as Starlette would match it (a trailing slash is tolerated for the
    OpenAI routes, as their clients send it), or None."""
    parts = path.split("/")
    if len(parts) > 2 and parts[-1] == "" and path.rstrip("/") in OPENAI_PATHS:
        parts = parts[:-1]
    for route in _BY_LENGTH.get(len(parts), ()):
        params: dict[str, str] = {}
        for want, got in zip(route.parts, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    break
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            return Match(route, params)
    return None
