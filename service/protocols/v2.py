"""Open Inference Protocol v2 (KServe / Triton), JSON and the binary tensor extension.

`tritonclient.http` sends binary tensors and no Content-Type, so infer bodies are read raw and
split by `service.oip_codec`. Per-request `parameters.delta` and `parameters.policy` steer the exit
rule; a per-sample `delta` input tensor may be sent instead. Per-sample results are output tensors.
"""

from __future__ import annotations

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import Field

from exitserve import __version__
from exitserve.errors import InvalidInput, NotFound
from exitserve.service.protocols.bodies import StrictBody, parse_off_loop, validate
from exitserve.service.protocols.hot_routes import BodyEndpoint
from exitserve.service.protocols.oip_codec import (
    decode_infer_request,
    encode_infer_response,
    resolve_outputs,
)
from exitserve.service.protocols.routes import V2_INFER, V2_VERSION_INFER
from exitserve.service.serving.context import MAX_REQUEST_ID_CHARS, REQUEST_ID
from exitserve.service.serving.dataplane import Dataplane
from exitserve.service.serving.repository import ServedModel

OUTPUTS = {
    # name: (datatype, per-sample shape suffix)
    "label": "BYTES",
    "class_index": "INT64",
    "exit": "INT64",
    "estimated_accuracy": "FP32",
    "promised_accuracy": "FP32",  # the guarded accuracy target_met rests on (>= delta where it is true)
    "target_met": "BOOL",
    "reason": "BYTES",  # why target_met is false: below_target, out_of_distribution, policy_unguarded; "" when true
    "compute_fraction": "FP32",
    "probabilities": "FP32",
}
DEFAULT_OUTPUTS = [name for name in OUTPUTS if name != "probabilities"]
DELTA_INPUT = "delta"
TEXT_INPUT = "text"  # text models: one UTF-8 string per sample (BYTES), tokenised by the server
EXTENSIONS = ["binary_tensor_data", "parameters", "model_configuration"]


_OIP_DATATYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32"}


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def model_metadata(model: ServedModel) -> dict:
    m = model.manifest
    return {
        "name": model.name,
        "versions": [m.version],
        "platform": "exitserve_onnx_chain",
        "inputs": [
            *([{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}] if m.input.text else []),
            {"name": m.input.name, "datatype": _OIP_DATATYPES[m.input.dtype], "shape": m.input.shape,
             **({"optional": True} if m.input.text else {})},
            {"name": DELTA_INPUT, "datatype": "FP64", "shape": [-1], "optional": True},
        ],
        "outputs": [
            {"name": name, "datatype": datatype, "shape": [-1, len(m.labels)] if name == "probabilities" else [-1]}
            for name, datatype in OUTPUTS.items()
        ],
        "parameters": {"exits": m.num_exits, "labels": m.labels, **model.trust()},
    }


def model_config(model: ServedModel, max_batch_size: int, max_queue_delay_ms: float) -> dict:
    metadata = model_metadata(model)
    return {
        "name": model.name,
        "platform": metadata["platform"],
        "max_batch_size": max_batch_size,
        "input": [{"name": i["name"], "data_type": f"TYPE_{i['datatype']}", "dims": i["shape"][1:]} for i in metadata["inputs"]],
        "output": [{"name": o["name"], "data_type": f"TYPE_{o['datatype'] if o['datatype'] != 'BYTES' else 'STRING'}", "dims": o["shape"][1:]} for o in metadata["outputs"]],
        "dynamic_batching": {"max_queue_delay_microseconds": int(max_queue_delay_ms * 1000)},
    }


class InferParameters(StrictBody):
    """Request-level parameters of an infer call (strict: `"delta": "0.9"` is refused)."""

    delta: float | None = Field(None, description="accuracy target in (0, 1] for every sample")
    policy: str | None = Field(None, description="exit policy (default: the server's)")
    binary_data_output: bool = Field(False, description="outputs as binary tensors by default")
    ood_guard: bool = Field(True, description="withhold the promise for inputs unlike the calibration data")


def build_router(dataplane: Dataplane) -> tuple[APIRouter, BodyEndpoint]:
    """The v2 routes, and the infer handler (request, body, model=, version=) that HotRoutes calls directly."""
    router = APIRouter(tags=["v2 (Open Inference Protocol)"])
    settings = dataplane.settings

    @router.get("/v2")
    async def server_metadata() -> Response:
        return _json({"name": "exitserve", "version": __version__, "extensions": EXTENSIONS})

    @router.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @router.get("/v2/health/ready")
    async def ready() -> Response:
        is_ready = dataplane.repository.ready
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    def _model(name: str, version: str | None) -> ServedModel:
        model = dataplane.model(name)
        if version is not None and version != model.manifest.version:
            raise NotFound(f"model {name!r} has no version {version!r} (serving {model.manifest.version!r})")
        return model

    @router.get("/v2/models/{model}")
    @router.get("/v2/models/{model}/versions/{version}")
    async def metadata(model: str, version: str | None = None) -> Response:
        return _json(model_metadata(_model(model, version)))

    @router.get("/v2/models/{model}/ready")
    @router.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None) -> Response:
        served = _model(model, version)
        return _json({"name": served.name, "ready": served.ready}, 200 if served.ready else 503)

    @router.get("/v2/models/{model}/config")
    async def config(model: str) -> Response:
        return _json(model_config(_model(model, None), settings.max_batch_size, settings.max_queue_delay_ms))

    async def infer_body(request: Request, body: bytes, model: str, version: str | None = None) -> Response:
        served = _model(model, version)
        dataplane.admit_early(served)  # a full queue answers 503 before the body is parsed
        decoded = await parse_off_loop(  # ProtocolError is an InvalidInput: a 400 naming the problem
            len(body), decode_infer_request, body, request.headers.get("inference-header-content-length"),
            request.headers.get("content-encoding"), settings.max_body_bytes,
        )
        if decoded.id is not None and len(decoded.id) > MAX_REQUEST_ID_CHARS:
            # The id is kept in the decision record for feedback: bounded like X-Request-Id, never cut.
            raise InvalidInput(f"id: {len(decoded.id)} characters exceed the limit of {MAX_REQUEST_ID_CHARS}")
        # Probabilities are sent only when asked for by name.
        outputs = resolve_outputs(decoded, list(OUTPUTS) if decoded.outputs else DEFAULT_OUTPUTS)
        x = await parse_off_loop(len(body), _model_input, served, decoded.inputs)
        params = validate(InferParameters, decoded.parameters, prefix="parameters")
        if DELTA_INPUT in decoded.inputs:
            delta = decoded.inputs[DELTA_INPUT].reshape(-1)
            deltas = dataplane.check_deltas(delta, len(x), where=f"inputs[{DELTA_INPUT}]")
        else:
            deltas = dataplane.check_deltas(params.delta, len(x), where="parameters.delta")
        policies = dataplane.check_policy(served, params.policy, len(x), where="parameters.policy")
        want_probabilities = any(name == "probabilities" for name, _ in outputs)
        if decoded.id:
            # OIP clients correlate by the request's `id` (echoed in the response): feedback uses it too.
            REQUEST_ID.set(str(decoded.id))
        prediction = await dataplane.infer(served, x, deltas, policies, want_probabilities, params.ood_guard)
        result = prediction.result
        arrays: dict[str, np.ndarray | None] = {
            "label": np.asarray([s.encode() for s in prediction.labels.tolist()], dtype=object),
            "class_index": result.class_index,
            "exit": result.exit_index,
            "estimated_accuracy": result.estimate.astype(np.float32),
            "promised_accuracy": (result.promised if result.promised is not None else np.zeros(len(x))).astype(np.float32),
            "target_met": result.target_met,
            "reason": np.asarray([(r or "").encode() for r in prediction.reasons], dtype=object),
            "compute_fraction": prediction.compute_fraction.astype(np.float32),
            "probabilities": result.probabilities,
        }
        body, headers = encode_infer_response(
            served.name, served.manifest.version, decoded.id,
            # probabilities are computed whenever they are asked for, so no requested output is None
            [(name, array, binary) for name, binary in outputs if (array := arrays[name]) is not None],
        )
        return Response(body, headers=headers)

    @router.post(V2_INFER.path)
    @router.post(V2_VERSION_INFER.path)
    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        return await infer_body(request, await request.body(), model=model, version=version)

    def _model_input(served: ServedModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The model's input tensor: as sent, or (text models) tokenised from the BYTES `text` input."""
        input_name = served.manifest.input.name
        accepted = [TEXT_INPUT, input_name] if served.tokenizer is not None else [input_name]
        unknown = set(inputs) - {*accepted, DELTA_INPUT}
        if unknown:
            raise InvalidInput(f"inputs: unknown input(s) {sorted(unknown)}; this model takes "
                               f"{' or '.join(map(repr, accepted))} and optionally {DELTA_INPUT!r}")
        given = [name for name in accepted if name in inputs]
        if len(given) != 1:
            raise InvalidInput(f"inputs: send exactly one of {accepted}" if given else f"inputs: missing {accepted[0]!r}")
        if given[0] != TEXT_INPUT:
            return dataplane.check_inputs(served, inputs[input_name], where=f"inputs[{input_name}]")
        raw = inputs[TEXT_INPUT]
        where = f"inputs[{TEXT_INPUT}]"
        if raw.ndim == 2 and raw.shape[1] == 1:  # [batch, 1], as Triton's text models usually declare it
            raw = raw[:, 0]
        if raw.dtype != object or raw.ndim != 1:
            raise InvalidInput(f"{where}: must be a BYTES tensor of shape [batch] or [batch, 1]")
        try:
            texts = [item.decode("utf-8") for item in raw.tolist()]
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{where}: element is not valid UTF-8 ({exc.reason})") from None
        return dataplane.check_texts(served, texts, where=where)

    return router, infer_body
