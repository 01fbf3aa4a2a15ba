"""Open Inference Protocol v2 (KServe / Triton) infer codec: JSON and the binary tensor extension.

Pure functions from bytes to numpy and back; no HTTP framework here. The HTTP layer passes the raw
body plus the ``Inference-Header-Content-Length`` and ``Content-Encoding`` header values, maps
:class:`ProtocolError` to 400 and anything else to 500.

Wire format (as the ``tritonclient`` package writes and reads it):

* body = JSON header, then the raw little-endian bytes of every binary tensor in tensor order;
  the JSON header's byte length travels in ``Inference-Header-Content-Length``;
* a binary tensor carries ``parameters.binary_data_size`` and no ``data``;
* BYTES elements are a 4-byte little-endian length followed by the bytes (binary) or a string (JSON).
"""

import json
import math
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from exitserve.errors import InvalidInput
from exitserve.service.protocols import numbers

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPES = ", ".join([*DATATYPE_TO_NUMPY, "BYTES"])
# (numpy kind, itemsize) -> datatype; byte order is irrelevant for naming.
_KIND_SIZE_TO_DATATYPE = {(dt.kind, dt.itemsize): name for name, dt in DATATYPE_TO_NUMPY.items()}
_Scalar = str | int | float | bool
_MISSING = object()  # tells an absent JSON key from an explicit null


class ProtocolError(InvalidInput):
    """The request (or what it asks of the response) breaks the protocol; the message says where."""


@dataclass
class RequestedOutput:
    name: str
    binary: bool  # already resolved against the request's binary_data_output default
    parameters: dict


@dataclass
class InferRequest:
    id: str | None
    parameters: dict[str, _Scalar]
    inputs: dict[str, np.ndarray]  # request order, shaped per "shape"
    input_parameters: dict[str, dict]  # per input, minus transport keys (binary_data_size)
    outputs: list[RequestedOutput] | None  # None = all outputs
    binary_output_default: bool


@dataclass
class _InputSpec:
    """One input's JSON description, validated, before its data is decoded."""

    where: str
    name: str
    datatype: str
    shape: list[int]
    count: int
    parameters: dict
    binary_size: int | None
    data: Any


# --------------------------------------------------------------------------------------------
# Request decoding
# --------------------------------------------------------------------------------------------


def decode_infer_request(
    body: bytes,
    header_length: str | None,
    content_encoding: str | None = None,
    max_body_bytes: int = 64 << 20,
) -> InferRequest:
    """Decode and validate an infer request body; raise ProtocolError naming the first problem."""
    # bytes, or the bytearray a large body is read into (hot_routes.read_body): not copied
    body = _decompress(body if isinstance(body, bytes | bytearray) else bytes(body), content_encoding, max_body_bytes)
    json_length = _parse_header_length(header_length, len(body))
    if json_length is None:
        doc, tail = _parse_json_with_numbers(body, "request body"), memoryview(b"")
    else:
        what = f"inference header (the first {json_length} bytes, per {HEADER_LENGTH})"
        doc, tail = _parse_json_with_numbers(body[:json_length], what), memoryview(body)[json_length:]

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, got {_json_type(request_id)}")
    parameters = _check_parameters(doc.get("parameters"), "request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError(
            f"request parameter 'binary_data_output' must be a boolean, got {_json_type(binary_default)}"
        )

    specs = _parse_input_specs(doc.get("inputs", _MISSING))
    _check_binary_layout(specs, json_length, len(tail))
    inputs, input_parameters, offset = {}, {}, 0
    for spec in specs:
        if spec.binary_size is None:
            inputs[spec.name] = _decode_json_data(spec)
        else:
            chunk = tail[offset : offset + spec.binary_size]
            offset += spec.binary_size
            inputs[spec.name] = _decode_binary_data(spec, chunk)
        input_parameters[spec.name] = spec.parameters

    return InferRequest(
        id=request_id,
        parameters=parameters,
        inputs=inputs,
        input_parameters=input_parameters,
        outputs=_parse_outputs(doc.get("outputs"), binary_default),
        binary_output_default=binary_default,
    )


def _decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    if len(body) > limit:
        raise ProtocolError(f"request body is {len(body)} bytes; the limit is {limit}")
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding in ("gzip", "x-gzip"):
        return _inflate(body, 16 + zlib.MAX_WBITS, limit, "gzip")
    if encoding == "deflate":
        # RFC 9110 "deflate" is zlib-wrapped (what tritonclient sends); some clients send raw deflate.
        wbits = zlib.MAX_WBITS if _has_zlib_header(body) else -zlib.MAX_WBITS
        return _inflate(body, wbits, limit, "deflate")
    raise ProtocolError(
        f"unsupported Content-Encoding {content_encoding!r}; supported: gzip, deflate, identity"
    )


def _has_zlib_header(data: bytes) -> bool:
    """RFC 1950: method 8 in the low nibble and the 16-bit header a multiple of 31."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _inflate(data: bytes, wbits: int, limit: int, encoding: str) -> bytes:
    """Inflate with the output capped at ``limit`` bytes, so a zip bomb costs at most ``limit``."""
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise ProtocolError(f"request body is not valid {encoding} data: {exc}") from None
        if len(out) > limit:
            raise ProtocolError(f"{encoding} request body inflates beyond the limit of {limit} bytes")
        if not inflater.eof:
            raise ProtocolError(f"{encoding} request body is truncated")
        data = inflater.unused_data
        if not data:
            return bytes(out)
        if encoding != "gzip":  # only gzip allows several concatenated members
            raise ProtocolError(f"{len(data)} bytes of garbage after the {encoding} stream")


def _parse_header_length(value: str | int | None, body_length: int) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {value!r}")
    length = int(text)
    if length < 0:
        raise ProtocolError(f"{HEADER_LENGTH} must not be negative, got {length}")
    if length > body_length:
        raise ProtocolError(f"{HEADER_LENGTH} is {length} but the body has only {body_length} bytes")
    return length


@dataclass
class _Numbers:
    """A large 'data' array left in the body, read by protocols/numbers.py once its datatype is known."""

    body: bytes
    start: int
    end: int


def _parse_json_with_numbers(raw: bytes, what: str) -> dict:
    """`_parse_json`, with each large 'data' array of numbers cut out before parsing (a Python float per
    number: about 10x the body) and put back as a `_Numbers` for `_decode_json_data`."""
    spans: list[tuple[int, int]] = []
    if len(raw) >= numbers.MIN_BYTES:
        while (span := numbers.numeric_span(raw, b"data", spans[-1][1] if spans else 0)) is not None:
            spans.append(span)
    if not spans:
        return _parse_json(raw, what)
    pieces, last = [], 0
    for k, (start, end) in enumerate(spans):
        pieces += [raw[last:start], b'["\\u0000numbers:%d"]' % k]
        last = end
    doc = _parse_json(b"".join([*pieces, raw[last:]]), what)
    inputs = doc.get("inputs")
    for item in inputs if isinstance(inputs, list) else []:
        data = item.get("data") if isinstance(item, dict) else None
        mark = data[0] if isinstance(data, list) and len(data) == 1 and isinstance(data[0], str) else ""
        if mark.startswith("\0numbers:") and mark[9:].isdigit() and int(mark[9:]) < len(spans):
            start, end = spans[int(mark[9:])]
            item["data"] = _Numbers(raw, start, end)
    return doc


def _parse_json(raw: bytes, what: str) -> dict:
    try:
        # Decoded here, strictly: json.loads(bytes) decodes with "surrogatepass", so encoded lone
        # surrogates (bytes ED A0 80) would pass as text no encoder accepts (issue 30).
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise ProtocolError(f"{what}: JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {_json_type(doc)}")
    if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw):  # rare: only then walk the strings
        bad = _lone_surrogate_at(doc)
        if bad is not None:
            raise ProtocolError(f"{what}: {bad} is not valid UTF-8 text (a lone UTF-16 surrogate escape)")
    return doc


# `json` (kept for its NaN / Infinity tokens, which Triton's clients send) decodes a lone surrogate
# escape such as "\ud800" to a str that no UTF-8 encoder accepts: a 500 wherever it was encoded.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate_at(doc: Any) -> str | None:
    """Where the first string (or key) holding a lone surrogate is, e.g. "inputs[0].data[3]"; None if none."""
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "a string"
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, f"{where}.{key!r}" if where else "a key"))
                stack.append((item, f"{where}.{key}" if where else str(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return None


def _check_parameters(value: Any, where: str) -> dict:
    """Parameters are a JSON object of scalars (the protocol allows string, number, boolean)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: 'parameters' must be a JSON object, got {_json_type(value)}")
    for key, item in value.items():
        if not isinstance(item, _Scalar):
            raise ProtocolError(
                f"{where}: parameter '{key}' must be a string, number or boolean, got {_json_type(item)}"
            )
    return value


def _parse_input_specs(value: Any) -> list[_InputSpec]:
    if value is _MISSING:
        raise ProtocolError("request has no 'inputs'")
    if not isinstance(value, list) or not value:
        raise ProtocolError("'inputs' must be a non-empty JSON array")
    specs: list[_InputSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        spec = _parse_input_spec(index, item)
        if spec.name in seen:
            raise ProtocolError(f"{spec.where}: duplicate input name")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _parse_input_spec(index: int, item: Any) -> _InputSpec:
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise ProtocolError(f"{where} must be a JSON object, got {_json_type(item)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where}: 'name' is missing or not a non-empty string")
    where = f"input '{name}'"
    datatype = item.get("datatype")
    if datatype is None:
        raise ProtocolError(f"{where}: 'datatype' is missing")
    # isinstance first: a list or object as datatype is unhashable and would escape as a 500.
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in DATATYPE_TO_NUMPY):
        raise ProtocolError(f"{where}: unknown datatype {datatype!r}; expected one of {_DATATYPES}")
    shape = _parse_shape(item.get("shape"), where)
    parameters = dict(_check_parameters(item.get("parameters"), where))
    if "shared_memory_region" in parameters:
        raise ProtocolError(f"{where}: the shared memory extension is not supported")
    binary_size = parameters.pop("binary_data_size", None)
    data = item.get("data", _MISSING)
    if binary_size is not None:
        if isinstance(binary_size, bool) or not isinstance(binary_size, int) or binary_size < 0:
            raise ProtocolError(
                f"{where}: 'binary_data_size' must be a non-negative integer, got {binary_size!r}"
            )
        if data is not _MISSING:
            raise ProtocolError(f"{where}: has both 'data' and 'binary_data_size'; send one")
    elif data is _MISSING:
        raise ProtocolError(f"{where}: has neither 'data' nor parameters.binary_data_size")
    return _InputSpec(where, name, datatype, shape, math.prod(shape), parameters, binary_size, data)


# numpy allows 64 dimensions and sizes below 2**63; a zero-size tensor of shape [0, 2**63] or one
# with 70 axes would pass every byte count and then fail in numpy (a 500). Tensors here are small.
MAX_DIMS = 16
MAX_DIM = 2**31 - 1


def _parse_shape(value: Any, where: str) -> list[int]:
    if value is None:
        raise ProtocolError(f"{where}: 'shape' is missing")
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: 'shape' must be a JSON array of integers, got {_json_type(value)}")
    if len(value) > MAX_DIMS:
        raise ProtocolError(f"{where}: 'shape' has {len(value)} dimensions; at most {MAX_DIMS} are accepted")
    for dim in value:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ProtocolError(f"{where}: 'shape' {value} holds a non-integer dimension {dim!r}")
        if dim < 0:
            raise ProtocolError(f"{where}: 'shape' {value} holds a negative dimension {dim}")
        if dim > MAX_DIM:
            raise ProtocolError(f"{where}: 'shape' {value} holds a dimension above {MAX_DIM}")
    return value


def _check_binary_layout(specs: list[_InputSpec], json_length: int | None, tail_length: int) -> None:
    """The binary sizes must account for exactly the bytes after the JSON header."""
    binary = [spec for spec in specs if spec.binary_size is not None]
    if binary and json_length is None:
        raise ProtocolError(
            f"{binary[0].where}: has binary_data_size but the request has no {HEADER_LENGTH} header"
        )
    total = sum(spec.binary_size or 0 for spec in binary)
    if total != tail_length:
        raise ProtocolError(
            f"binary_data_size values sum to {total} bytes but {tail_length} bytes follow the "
            f"{json_length}-byte JSON header"
        )


def _decode_binary_data(spec: _InputSpec, chunk: memoryview) -> np.ndarray:
    if spec.datatype == "BYTES":
        return _decode_bytes_elements(spec, chunk)
    dtype = DATATYPE_TO_NUMPY[spec.datatype]
    expected = spec.count * dtype.itemsize
    if spec.binary_size != expected:
        raise ProtocolError(
            f"{spec.where}: binary_data_size is {spec.binary_size} bytes but shape {spec.shape} "
            f"of {spec.datatype} needs {expected}"
        )
    if spec.datatype == "BOOL" and spec.count and np.frombuffer(chunk, np.uint8).max() > 1:
        raise ProtocolError(f"{spec.where}: BOOL binary data holds bytes other than 0 and 1")
    # copy: the array owns aligned, writable memory instead of pinning the request body
    return np.frombuffer(chunk, dtype).reshape(spec.shape).copy()


def _decode_bytes_elements(spec: _InputSpec, chunk: memoryview) -> np.ndarray:
    """BYTES binary layout: per element, a 4-byte little-endian length then that many bytes."""
    size = len(chunk)
    if spec.count * 4 > size:  # cheap guard before a loop over a huge claimed shape
        raise ProtocolError(
            f"{spec.where}: {size} bytes of BYTES data cannot hold {spec.count} elements "
            "(each needs a 4-byte length prefix)"
        )
    items, offset = [], 0
    for index in range(spec.count):
        if offset + 4 > size:
            raise ProtocolError(f"{spec.where}: BYTES element {index} is truncated (no length prefix)")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > size:
            raise ProtocolError(
                f"{spec.where}: BYTES element {index} claims {length} bytes but only {size - offset} remain"
            )
        items.append(bytes(chunk[offset : offset + length]))
        offset += length
    if offset != size:
        raise ProtocolError(
            f"{spec.where}: {size - offset} bytes left over after {spec.count} BYTES elements"
        )
    return _object_array(items, spec.shape)


def _decode_json_data(spec: _InputSpec) -> np.ndarray:
    if isinstance(spec.data, _Numbers):
        return _decode_numbers(spec, spec.data)
    if not isinstance(spec.data, list):
        raise ProtocolError(f"{spec.where}: 'data' must be a JSON array, got {_json_type(spec.data)}")
    if spec.datatype == "BYTES":
        return _decode_json_bytes(spec)
    return _decode_json_numbers(spec, DATATYPE_TO_NUMPY[spec.datatype])


def _decode_json_bytes(spec: _InputSpec) -> np.ndarray:
    # not np.array(list of str): numpy's fixed-width strings drop trailing NULs
    items = list(_iter_flat(spec.data))
    _check_count(spec, len(items))
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ProtocolError(
                f"{spec.where}: BYTES 'data' element {index} must be a string, got {_json_type(item)}"
            )
    return _object_array([item.encode("utf-8") for item in items], spec.shape)


def _decode_numbers(spec: _InputSpec, found: _Numbers) -> np.ndarray:
    """A large 'data' array: floats read straight into numpy; other datatypes by the JSON path."""
    dtype = DATATYPE_TO_NUMPY.get(spec.datatype)
    if dtype is None or dtype.kind != "f":
        spec.data = _parse_json(b'{"data": ' + found.body[found.start:found.end] + b"}", f"{spec.where}: 'data'")["data"]
        return _decode_json_data(spec)
    where = f"{spec.where}: 'data'"
    try:
        array = numbers.parse_numbers(found.body, found.start, found.end, where, np.float64 if dtype.itemsize == 8 else np.float32)
    except InvalidInput as exc:
        raise ProtocolError(str(exc)) from None
    _check_count(spec, array.size)
    with np.errstate(over="ignore"):
        array = array.astype(dtype, copy=False)
    if np.isinf(array).any():  # JSON has no infinity: every one is an overflow
        raise ProtocolError(f"{spec.where}: 'data' holds values too large for {spec.datatype}")
    return array.reshape(spec.shape)


def _decode_json_numbers(spec: _InputSpec, dtype: np.dtype) -> np.ndarray:
    try:
        raw = np.array(spec.data)  # let numpy infer, then check the kind: a dtype= cast would accept "1"
    except ValueError:
        raise ProtocolError(
            f"{spec.where}: 'data' nesting is not rectangular; send a flat array or equal-length rows"
        ) from None
    _check_count(spec, raw.size)
    if raw.size == 0:
        return np.empty(spec.shape, dtype)
    if not _kind_fits(raw.dtype.kind, dtype.kind):
        raise ProtocolError(f"{spec.where}: {_describe_bad_element(spec, dtype)}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ProtocolError(f"{spec.where}: 'data' holds values outside the {spec.datatype} range")
    with np.errstate(over="ignore"):  # overflow is reported below, with the input's name
        array = raw.astype(dtype)
    if dtype.kind == "f" and np.any(np.isinf(array) & np.isfinite(raw)):
        raise ProtocolError(f"{spec.where}: 'data' holds values too large for {spec.datatype}")
    return array.reshape(spec.shape)


def _kind_fits(source: str, target: str) -> bool:
    if target == "b":
        return source == "b"
    if target in "iu":
        return source in "iu"
    return source in "iuf"


def _describe_bad_element(spec: _InputSpec, dtype: np.dtype) -> str:
    """Error path only: find the first element of the wrong JSON type, for a message that helps."""
    expected = {"b": "booleans", "i": "integers", "u": "integers"}.get(dtype.kind, "numbers")
    for index, item in enumerate(_iter_flat(spec.data)):
        if not _element_fits(item, dtype.kind):
            return (
                f"{spec.datatype} 'data' must hold {expected}; element {index} is "
                f"{_json_type(item)} {json.dumps(item)[:40]}"
            )
    return f"'data' holds integers outside the {spec.datatype} range"


def _element_fits(item: Any, kind: str) -> bool:
    if kind == "b":
        return isinstance(item, bool)
    if isinstance(item, bool):
        return False
    return isinstance(item, int) if kind in "iu" else isinstance(item, int | float)


def _check_count(spec: _InputSpec, count: int) -> None:
    if count != spec.count:
        raise ProtocolError(
            f"{spec.where}: 'data' has {count} elements but shape {spec.shape} needs {spec.count}"
        )


def _iter_flat(data: list) -> Iterator[Any]:
    """Row-major leaves of nested lists, without recursion (JSON nesting can be deep)."""
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _object_array(items: list, shape: list[int]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items  # element-wise: np.array(items) would build a fixed-width bytes array
    return array.reshape(shape)


def _parse_outputs(value: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError(f"'outputs' must be a JSON array, got {_json_type(value)}")
    if not value:  # tritonclient never sends []; KServe reads it as "all outputs"
        return None
    requested, seen = [], set()
    for index, item in enumerate(value):
        where = f"outputs[{index}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"{where} must be a JSON object, got {_json_type(item)}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"{where}: 'name' is missing or not a non-empty string")
        where = f"output '{name}'"
        if name in seen:
            raise ProtocolError(f"{where}: requested twice")
        seen.add(name)
        parameters = _check_parameters(item.get("parameters"), where)
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(
                f"{where}: parameter 'binary_data' must be a boolean, got {_json_type(binary)}"
            )
        if "shared_memory_region" in parameters:
            raise ProtocolError(f"{where}: the shared memory extension is not supported")
        if parameters.get("classification"):
            raise ProtocolError(f"{where}: the classification extension is not supported")
        requested.append(RequestedOutput(name, binary, parameters))
    return requested


def resolve_outputs(request: InferRequest, available: list[str]) -> list[tuple[str, bool]]:
    """(name, binary?) of each output to send, in the order the client asked for them."""
    if request.outputs is None:
        return [(name, request.binary_output_default) for name in available]
    known = set(available)
    for output in request.outputs:
        if output.name not in known:
            raise ProtocolError(
                f"output '{output.name}' is not an output of this model; available: {', '.join(available)}"
            )
    return [(output.name, output.binary) for output in request.outputs]


# --------------------------------------------------------------------------------------------
# Response encoding
# --------------------------------------------------------------------------------------------


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode an infer response; binary outputs follow the JSON header in output order."""
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = str(model_version)
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    tensors, chunks, any_binary = [], [], False
    for name, value, binary in outputs:
        array = np.asarray(value)
        datatype = numpy_to_datatype(array)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = _tensor_bytes(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
            any_binary = True
        else:
            tensor["data"] = _tensor_json(array, datatype, name)
        tensors.append(tensor)
    header["outputs"] = tensors
    # Non-finite floats go out as NaN/Infinity, which tritonclient's rapidjson reads back.
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if not any_binary:
        return head, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return b"".join([head, *chunks]), headers


def numpy_to_datatype(array: Any) -> str:
    """Protocol datatype of a numpy array (or dtype); TypeError if the protocol has none."""
    dtype = array.dtype if hasattr(array, "dtype") else np.dtype(array)
    if dtype.kind in "OSU":
        return "BYTES"
    datatype = _KIND_SIZE_TO_DATATYPE.get((dtype.kind, dtype.itemsize))
    if datatype is None:
        raise TypeError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return datatype


def _tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.ravel():
            raw = _element_bytes(item)
            parts += (struct.pack("<I", len(raw)), raw)
        return b"".join(parts)
    # astype to the little-endian dtype also fixes big-endian arrays; tobytes is row-major
    return array.astype(DATATYPE_TO_NUMPY[datatype], copy=False).tobytes(order="C")


def _tensor_json(array: np.ndarray, datatype: str, name: str) -> list:
    if datatype != "BYTES":
        return array.ravel().tolist()
    try:
        return [_element_text(item) for item in array.ravel()]
    except UnicodeDecodeError:
        raise ProtocolError(
            f"output '{name}' holds bytes that are not UTF-8 text; request it with binary_data=true"
        ) from None


def _element_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    return str(item).encode("utf-8")


def _element_text(item: Any) -> str:
    if isinstance(item, bytes):
        return item.decode("utf-8")
    return str(item)


def _json_type(value: Any) -> str:
    """JSON's name for a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
