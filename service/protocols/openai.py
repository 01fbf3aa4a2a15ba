"""OpenAI-compatible text generation: POST /v1/completions and /v1/chat/completions.

The `openai` Python package works unchanged as a client. exitserve's own fields: `delta` (promised
per-token agreement with the full model; 1 = exact mode) and `policy` (an exit policy, `exact`, or
`full`) as extra body fields; every response carries an `exitserve` extension with the exit index
and decoder layer count of each token and the mean compute fraction. Streams are server-sent events
ending with `data: [DONE]`. Sampling (temperature > 0) draws from the answering exit's distribution;
exact mode is greedy only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from exitserve.calibration import POLICIES
from exitserve.calibration.document import Delta
from exitserve.errors import ExitserveError, InvalidInput, NotFound, Overloaded
from exitserve.service.protocols.bodies import Schema, parse_body
from exitserve.service.protocols.edge import SERVED_MODEL
from exitserve.service.protocols.routes import OPENAI_CHAT, OPENAI_COMPLETIONS
from exitserve.service.serving.generation.repository import GenerationRepository
from exitserve.service.serving.generation.stream import (
    GenerationParams,
    Mode,
    TokenEvent,
    TokenStream,
)

MODES = ("exact", "full")
# Exact mode drafts a token where the pcee table promises at least this agreement (δ = 1 asks for
# exactness, not for a draft threshold); `policy: exact` with a δ below 1 sets it per request.
EXACT_DRAFT_DELTA = 0.8
DISCONNECT_POLL_S = 0.25


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: 0 only")
    # exitserve's extension (extra_body in the openai client)
    delta: Delta | None = Field(None, description="promised per-token agreement with the full model, a number in (0, 1]")
    policy: str | None = Field(None, description=f"an exit policy, or {' / '.join(MODES)}")


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise InvalidInput("stop: at most 4 non-empty strings")
    return stops


class _Generation:
    """One request's run: parameters resolved, the stream read, stop strings applied, text built."""

    def __init__(self, repository: GenerationRepository, body: _Body, prompt_ids: list[int], default_delta: float,
                 default_policy: str):
        name = body.model or repository.default_name()
        model = repository.models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}; served: {', '.join(repository.models) or 'none'}")
        if not model.ready:
            raise Overloaded(f"model {name!r} is warming up")
        self.model, self.name = model, name
        limit = model.spec.max_context
        # OpenAI's defaults: 16 for completions; chat runs until the end of the answer (bounded here)
        default = 16 if isinstance(body, CompletionRequest) else max(1, min(repository.max_tokens_limit,
                                                                              limit - len(prompt_ids)))
        max_tokens = body.max_completion_tokens or body.max_tokens or default
        if max_tokens > repository.max_tokens_limit:
            raise InvalidInput(f"max_tokens: {max_tokens} exceeds the limit of {repository.max_tokens_limit}")
        if not prompt_ids:
            raise InvalidInput("prompt: empty after tokenisation")
        if len(prompt_ids) + max_tokens > limit:
            raise InvalidInput(f"prompt: {len(prompt_ids)} tokens + max_tokens {max_tokens} exceed the context "
                               f"limit of {limit} tokens")
        if body.top_p != 1.0:
            raise InvalidInput("top_p: only 1 is supported")
        delta = body.delta if body.delta is not None else default_delta
        policy = body.policy or default_policy
        if policy == "exact" or delta == 1.0:
            mode = "exact"
        elif policy == "full":
            mode = "full"
        elif policy in POLICIES:
            mode = "early"
        else:
            raise InvalidInput(f"policy: unknown {policy!r}; choose from {', '.join((*POLICIES, *MODES))}")
        if mode == "exact" and not model.exact_mode:
            raise InvalidInput("exact mode (delta 1 or policy exact) is off: this server computes with int8 "
                               "activations, which round differently for one token and for several")
        if mode == "exact" and body.temperature > 0:
            raise InvalidInput("exact mode (delta 1 or policy exact) is greedy: set temperature to 0")
        self.mode, self.delta, self.policy = mode, delta, (policy if mode == "early" else "pcee")
        draft_delta = (delta if delta < 1.0 else EXACT_DRAFT_DELTA) if mode == "exact" else delta
        self.stops = _stops(body.stop)
        self.prompt_ids = prompt_ids
        self.params = GenerationParams(
            prompt=prompt_ids, max_tokens=max_tokens, mode=cast(Mode, mode), delta=draft_delta, policy=self.policy,
            temperature=body.temperature, seed=body.seed, stop_ids=model.stop_ids,
        )
        self.ids: list[int] = []
        self.exits: list[int] = []
        self.target_met: list[bool] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stream: TokenStream | None = None

    def start(self) -> None:
        self.stream = self.model.scheduler.submit(self.params, asyncio.get_running_loop())  # QueueFull: a 503

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()

    def absorb(self, event: TokenEvent) -> str:
        """Take an event's tokens; return the new text that may be sent (held back at a stop string's prefix)."""
        eos = self.model.stop_ids
        for t in event.tokens:
            if t.token in eos:
                continue
            self.ids.append(t.token)
            self.exits.append(t.exit)
            self.target_met.append(t.target_met)
        if event.finish_reason and event.finish_reason.startswith("error"):
            raise ExitserveError(f"generation failed: {event.finish_reason[7:]}")
        full = self.model.decode(self.ids)
        if full.endswith("\ufffd") and not event.finish_reason:
            return ""  # an incomplete UTF-8 character: wait for the next token
        for stop in self.stops:
            at = full.find(stop)
            if at >= 0:
                self.finish_reason = "stop"
                self.cancel()
                return self._advance(full[:at])
        if event.finish_reason:
            self.finish_reason = event.finish_reason
            return self._advance(full)
        # hold back a tail that could still become a stop string
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = len(full)
        for stop in self.stops:
            for k in range(min(hold, len(full)), 0, -1):
                if stop.startswith(full[-k:]):
                    safe = min(safe, len(full) - k)
                    break
        return self._advance(full[:safe])

    def _advance(self, visible: str) -> str:
        new = visible[len(self.text):] if visible.startswith(self.text) else ""
        self.text = visible if visible.startswith(self.text) else self.text
        return new

    async def events(self, request: Request) -> AsyncIterator[str]:
        """New text per engine event until the generation finishes; stops it if the client leaves."""
        assert self.stream is not None
        try:
            while self.finish_reason is None:
                try:
                    event = await asyncio.wait_for(self.stream.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.cancel()
                        return
                    continue
                yield self.absorb(event)
        finally:
            if self.finish_reason is None:
                self.cancel()

    def usage(self) -> dict[str, int]:
        completion = len(self.ids)  # as OpenAI counts: the answer's tokens, not the end token that closed it
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion}

    def extension(self) -> dict[str, Any]:
        layers = self.model.exit_layers
        fractions = self.model.compute_fractions
        exits = self.exits
        mean = sum(fractions[e] for e in exits) / len(exits) if exits else 0.0
        ext: dict[str, Any] = {
            "mode": self.mode, "delta": self.delta, "policy": self.policy if self.mode == "early" else self.mode,
            "exits": exits, "exit_layers": [layers[e] + 1 for e in exits], "num_layers": layers[-1] + 1,
            "mean_compute_fraction": mean,
            # per token: agreement with the full model's greedy token promised at >= delta
            "target_met": self.target_met,
            "weights": self.model.precision,
            "activations": "float32" if self.model.exact_mode else "int8",
        }
        if self.mode != "full" and self.stream is not None:  # exit drafts (exact mode) and lookup drafts
            ext["drafted"], ext["accepted"] = self.stream.drafted, self.stream.accepted
        return ext


async def _parse(request: Request, schema: type[Schema]) -> Schema:
    return parse_body(schema, await request.body())  # the same 400s as every other JSON route


def _sse(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def build_router(repository: GenerationRepository, default_delta: float, default_policy: str) -> APIRouter:
    router = APIRouter(tags=["openai"])
    policy = default_policy if default_policy in POLICIES else "pcee"

    async def run(request: Request, body: _Body, prompt_ids: list[int], chat: bool) -> Response:
        gen = _Generation(repository, body, prompt_ids, default_delta, policy)
        gen.start()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def sse() -> AsyncIterator[bytes]:
                first = True
                async for piece in gen.events(request):
                    if not piece and gen.finish_reason is None:
                        continue
                    choice: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason}
                    if chat:
                        choice["delta"] = {"role": "assistant", "content": piece} if first else {"content": piece}
                    else:
                        choice["text"], choice["logprobs"] = piece, None
                    first = False
                    chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                             "model": gen.name, "choices": [choice]}
                    if gen.finish_reason is not None:
                        chunk["exitserve"] = gen.extension()
                    yield _sse(chunk)
                if gen.finish_reason is not None and include_usage:
                    yield _sse({"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                                "model": gen.name, "choices": [], "usage": gen.usage()})
                yield b"data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async for _ in gen.events(request):
            pass
        if gen.finish_reason is None:  # the client left
            return Response(status_code=499)
        choice = {"index": 0, "finish_reason": gen.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": gen.text}
        else:
            choice["text"] = gen.text
        payload = {"id": rid, "object": kind, "created": created, "model": gen.name, "choices": [choice],
                   "usage": gen.usage(), "exitserve": gen.extension()}
        return Response(orjson.dumps(payload), media_type="application/json")

    @router.post(OPENAI_COMPLETIONS.path, openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        # Errors in OpenAI's shape: protocols/errors.py answers every error raised on these paths.
        return await _completions(request, await _parse(request, CompletionRequest))

    @router.post(OPENAI_CHAT.path, openapi_extra=_body_schema(ChatRequest))
    async def chat_completions(request: Request) -> Response:
        return await _chat(request, await _parse(request, ChatRequest))

    async def _completions(request: Request, body: CompletionRequest) -> Response:
        model = _model_for(repository, body, request)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise InvalidInput("prompt: one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(model.encode, prompt)
        else:
            vocab = model.model.config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
                raise InvalidInput(f"prompt: token ids must lie in [0, {vocab})")
            ids = list(prompt)
        return await run(request, body, ids, chat=False)

    async def _chat(request: Request, body: ChatRequest) -> Response:
        model = _model_for(repository, body, request)
        if model.chat_template is None:
            raise InvalidInput(f"model {model.name!r} has no chat template; use /v1/completions")
        text = model.chat_template.render([m.model_dump(exclude_none=True) for m in body.messages])
        ids = await asyncio.to_thread(model.encode, text)
        return await run(request, body, ids, chat=True)

    return router


def _body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _model_for(repository: GenerationRepository, body: _Body, request: Request):
    name = body.model or repository.default_name()
    model = repository.models.get(name)
    if model is None:
        raise NotFound(f"unknown model {name!r}; served: {', '.join(repository.models) or 'none'}")
    setattr(request.state, SERVED_MODEL, model.name)  # the edge counts the request under this model
    return model
