"""REST API v1: `POST /v1/models/{model}/predict` with a per-request accuracy target.

The body is parsed by its pydantic schema `PredictRequest` (strict; unknown keys refused), which
also documents the API in OpenAPI; the samples themselves go to numpy.
"""

from __future__ import annotations

import binascii
import math
from typing import Annotated, Any, Literal, get_args

import numpy as np
import orjson
import pybase64
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from exitserve.errors import InvalidInput
from exitserve.service.protocols.bodies import StrictBody, parse_body_with_numbers, parse_off_loop
from exitserve.service.protocols.hot_routes import BodyEndpoint
from exitserve.service.protocols.routes import V1_PREDICT
from exitserve.service.serving.dataplane import Dataplane, Prediction
from exitserve.service.serving.repository import ServedModel

RawDtype = Literal["float32", "float16", "float64", "uint8", "int8", "int32", "int64"]
RAW_DTYPES = frozenset(get_args(RawDtype))


class RawTensor(StrictBody):
    b64: str = Field(description="base64 of the raw little-endian bytes, row-major")
    dtype: RawDtype = Field(description=f"one of {sorted(RAW_DTYPES)}")
    # Bounded like the Open Inference Protocol's shapes: numpy refuses more than 64 axes or sizes near
    # 2**63 even for zero-size tensors (a 500 if not caught here).
    shape: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        max_length=16, description="full shape including the batch axis")


class PredictRequest(StrictBody):
    # list[Any]: the nested numbers go to numpy unvalidated by pydantic (walking thousands of floats
    # through a schema costs more than running the model); numpy refuses ragged or non-numeric lists.
    inputs: list[Any] | RawTensor | None = Field(None, description="a batch of samples as nested lists, or a raw tensor (token ids for text models)")
    texts: list[str] | None = Field(None, description="text models: one string per sample, tokenised by the bundle's tokenizer")
    delta: float | list[float] | None = Field(None, description="accuracy target in (0, 1]; one value or one per sample")
    policy: str | None = Field(None, description="exit policy, e.g. pcee-lb-tail (the default), pcee-lb-cond, pcee-cond, pcee, confidence, full")
    return_probabilities: bool = False
    ood_guard: bool = Field(True, description="withhold the promise for inputs unlike the calibration data "
                            "(where the bundle has an input guard: `input_guard` in GET /v1/models)")


class SamplePrediction(BaseModel):
    label: str
    class_index: int
    exit: int = Field(description="index of the exit that answered, from 0")
    exits_total: int
    estimated_accuracy: float = Field(description="calibrated accuracy of answers about as confident as this one")
    promised_accuracy: float = Field(description="the guarded accuracy target_met rests on: a lower bound on the "
                                     "accuracy of the answers this one is promised with; >= delta whenever target_met")
    target_met: bool = Field(description="the answer is promised: correct at a rate >= delta")
    reason: Literal["below_target", "out_of_distribution", "policy_unguarded"] | None = Field(
        description="why target_met is false (null when it is true)")
    compute_fraction: float = Field(description="cumulative FLOPs at the exit / FLOPs of the full model")
    probabilities: list[float] | None = None


class PredictResponse(BaseModel):
    model: str
    request_id: str
    predictions: list[SamplePrediction]


def decode_raw_tensor(raw: RawTensor, where: str = "inputs") -> np.ndarray:
    dtype, shape = raw.dtype, raw.shape
    try:
        data = pybase64.b64decode(raw.b64, validate=True)  # the standard library's rules, SIMD speed
    except (binascii.Error, TypeError, ValueError):
        raise InvalidInput(f"{where}.b64: not valid base64") from None
    # math.prod on Python ints: np.prod wraps around at 2**64, so a huge shape could claim 0 bytes.
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise InvalidInput(f"{where}.b64: {len(data)} bytes, but shape {shape} of {dtype} needs {expected}")
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def decode_nested(values: Any, where: str = "inputs", dtype: np.dtype | None = None) -> np.ndarray:
    integer = dtype is not None and dtype.kind in "iu"
    try:
        # Parsed without a dtype first, so that strings ("0.5") and booleans are refused as they are for
        # delta, not converted; integer models (token ids) get integers, so 1.5 is refused, not truncated.
        array = np.asarray(values)
    except (ValueError, TypeError):
        raise InvalidInput(f"{where}: must be a rectangular nested list of numbers") from None
    if array.dtype.kind not in "iuf":
        raise InvalidInput(f"{where}: must be a rectangular nested list of numbers (not strings or booleans)")
    if not integer:
        with np.errstate(over="ignore"):  # beyond float32: infinity, refused by the dataplane's check
            return array.astype(np.float32, copy=False)
    if array.dtype.kind not in "iu" and array.size:
        raise InvalidInput(f"{where}: this model takes integers (token ids), got {array.dtype.name} values")
    return array.astype(dtype) if array.dtype.kind not in "iu" else array


def _decode_inputs(dataplane: Dataplane, served: ServedModel, raw: list[Any] | RawTensor | np.ndarray | None) -> np.ndarray:
    if isinstance(raw, np.ndarray):  # a large nested list, already read by protocols/numbers.py
        x = raw if served.input_dtype.kind not in "iu" else _token_ids(raw, served.input_dtype)
    else:
        x = decode_raw_tensor(raw) if isinstance(raw, RawTensor) else decode_nested(raw, dtype=served.input_dtype)
    return dataplane.check_inputs(served, x)


def _token_ids(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if not np.array_equal(x, np.trunc(x)):
        raise InvalidInput("inputs: this model takes integers (token ids), got float values")
    return x.astype(dtype)


def encode_predictions(prediction: Prediction, want_probabilities: bool) -> list[dict]:
    result = prediction.result
    exits_total = prediction.model.manifest.num_exits
    labels = prediction.labels.tolist()
    columns = zip(
        labels, result.class_index.tolist(), result.exit_index.tolist(), result.estimate.tolist(),
        _promised(result.promised, len(labels)), result.target_met.tolist(), prediction.reasons,
        prediction.compute_fraction.tolist(), strict=True,
    )
    out = [
        {"label": label, "class_index": c, "exit": e, "exits_total": exits_total, "estimated_accuracy": est,
         "promised_accuracy": promised, "target_met": met, "reason": reason, "compute_fraction": frac}
        for label, c, e, est, promised, met, reason, frac in columns
    ]
    if want_probabilities and result.probabilities is not None:
        for entry, probs in zip(out, result.probabilities.tolist(), strict=True):
            entry["probabilities"] = probs
    return out


def _promised(values: np.ndarray | None, n: int) -> list[float]:
    return [0.0] * n if values is None else values.tolist()


def build_router(dataplane: Dataplane) -> tuple[APIRouter, BodyEndpoint]:
    """The v1 routes, and the predict handler (request, body, model=) that HotRoutes calls directly."""
    router = APIRouter(tags=["v1"])

    async def predict_body(request: Request, raw_body: bytes, model: str) -> Response:
        served = dataplane.model(model)
        dataplane.admit_early(served)  # a full queue answers 503 before the body is parsed
        body = await parse_off_loop(len(raw_body), parse_body_with_numbers, PredictRequest, raw_body, "inputs")
        if (body.inputs is None) == (body.texts is None):
            raise InvalidInput("body: give either 'inputs' or 'texts', not both" if body.inputs is not None
                               else "inputs: required (or 'texts' for a text model)")
        if body.texts is not None:
            x = await parse_off_loop(len(raw_body), dataplane.check_texts, served, body.texts)
        else:
            raw = body.inputs
            x = await parse_off_loop(len(raw_body), _decode_inputs, dataplane, served, raw)
        deltas = dataplane.check_deltas(body.delta, len(x))
        policies = dataplane.check_policy(served, body.policy, len(x))
        want = body.return_probabilities
        prediction = await dataplane.infer(served, x, deltas, policies, want, body.ood_guard)
        response = {"model": served.name, "request_id": request.state.request_id, "predictions": encode_predictions(prediction, want)}
        return Response(orjson.dumps(response), media_type="application/json")

    @router.post(
        V1_PREDICT.path,
        response_model=PredictResponse,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}}}},
        summary="Classify a batch; each sample stops at the first exit whose estimated accuracy reaches delta",
    )
    async def predict(model: str, request: Request) -> Response:
        return await predict_body(request, await request.body(), model=model)

    return router, predict_body
