"""Open Inference Protocol codec against the real tritonclient: its request bodies in, our responses out."""

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from exitserve.service.protocols.oip_codec import (
    DATATYPE_TO_NUMPY,
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    decode_infer_request,
    encode_infer_response,
    numpy_to_datatype,
    resolve_outputs,
)

RNG = np.random.default_rng(0)
SAMPLES = {
    "FP32": RNG.standard_normal((2, 3)).astype(np.float32),
    "FP16": RNG.standard_normal((4,)).astype(np.float16),
    "INT64": np.array([[-(2**62), 0, 7], [2**62, -1, 3]], dtype=np.int64),
    "BOOL": np.array([[True, False], [False, True]]),
    "BYTES": np.array([[b"cat", b""], [b"caf\xc3\xa9", b"dog"]], dtype=object),
}


def client_body(inputs, **kwargs) -> tuple[bytes, str | None]:
    """Request body exactly as tritonclient would POST it, and the header value it would send."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, **kwargs)
    return body, None if json_size is None else str(json_size)


def client_input(name: str, array: np.ndarray, binary: bool) -> httpclient.InferInput:
    datatype = "BYTES" if array.dtype == object else numpy_to_datatype(array)
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def crafted(header: dict, tail: bytes = b"") -> tuple[bytes, str]:
    """A hand-made binary-layout body, for requests the client library would refuse to build."""
    head = json.dumps(header).encode()
    return head + tail, str(len(head))


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
    else:
        assert actual.tobytes() == expected.tobytes()


# ------------------------------------------------------------------ requests from the real client


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_client_request_round_trip(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype]
    body, header_length = client_body([client_input("x", array, binary)])
    assert (header_length is not None) == binary

    request = decode_infer_request(body, header_length)

    assert list(request.inputs) == ["x"]
    assert_same(request.inputs["x"], array)
    assert request.input_parameters["x"] == {}  # binary_data_size is transport, not model, business


def test_mixed_request_keeps_order_id_parameters_and_outputs() -> None:
    inputs = [
        client_input("image", SAMPLES["FP32"], binary=True),
        client_input("ids", SAMPLES["INT64"], binary=False),
        client_input("mask", SAMPLES["BOOL"], binary=True),
        client_input("text", SAMPLES["BYTES"], binary=False),
        client_input("half", SAMPLES["FP16"], binary=True),
    ]
    outputs = [
        httpclient.InferRequestedOutput("exit_index", binary_data=False),
        httpclient.InferRequestedOutput("probabilities", binary_data=True),
    ]
    body, header_length = client_body(
        inputs, outputs=outputs, request_id="req-7", parameters={"delta": 0.95, "policy": "pcee"}
    )

    request = decode_infer_request(body, header_length)

    assert request.id == "req-7"
    assert request.parameters == {"delta": 0.95, "policy": "pcee"}
    assert list(request.inputs) == ["image", "ids", "mask", "text", "half"]
    for name, key in zip(request.inputs, ["FP32", "INT64", "BOOL", "BYTES", "FP16"], strict=True):
        assert_same(request.inputs[name], SAMPLES[key])
    assert request.binary_output_default is False
    assert [(o.name, o.binary) for o in request.outputs] == [("exit_index", False), ("probabilities", True)]
    available = ["probabilities", "exit_index", "estimate"]
    assert resolve_outputs(request, available) == [("exit_index", False), ("probabilities", True)]


def test_no_outputs_named_means_all_outputs_in_binary() -> None:
    body, header_length = client_body([client_input("x", SAMPLES["FP32"], binary=False)])

    request = decode_infer_request(body, header_length)

    assert request.outputs is None
    assert request.binary_output_default is True  # tritonclient sets parameters.binary_data_output
    assert resolve_outputs(request, ["a", "b"]) == [("a", True), ("b", True)]


def test_requested_output_without_binary_flag_follows_request_default() -> None:
    header = {
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
        "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
    }
    request = decode_infer_request(json.dumps(header).encode(), None)
    assert resolve_outputs(request, ["a", "b"]) == [("a", True), ("b", False)]


def test_resolve_outputs_names_unknown_output() -> None:
    outputs = [httpclient.InferRequestedOutput("logits")]
    body, header_length = client_body([client_input("x", SAMPLES["FP32"], True)], outputs=outputs)
    request = decode_infer_request(body, header_length)
    with pytest.raises(ProtocolError, match="'logits'.*available: probabilities, exit_index"):
        resolve_outputs(request, ["probabilities", "exit_index"])


def test_binary_bytes_keep_nuls_and_non_utf8() -> None:
    array = np.array([b"a\x00", b"\xff\xfe", b"", b"\x00"], dtype=object)
    body, header_length = client_body([client_input("blob", array, binary=True)])
    assert_same(decode_infer_request(body, header_length).inputs["blob"], array)


def test_empty_tensors_decode_to_their_shape() -> None:
    empty = np.zeros((0, 3), dtype=np.float32)
    inputs = [client_input("a", empty, binary=True), client_input("b", empty, binary=False)]
    body, header_length = client_body(inputs)
    request = decode_infer_request(body, header_length)
    assert_same(request.inputs["a"], empty)
    assert_same(request.inputs["b"], empty)


def test_nested_json_data_is_row_major() -> None:
    header = {
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "INT32", "data": [[1, 2, 3], [4, 5, 6]]},
            {"name": "y", "shape": [3, 2], "datatype": "FP64", "data": [1, 2, 3, 4, 5, 6.5]},
            {"name": "s", "shape": [1, 2], "datatype": "BYTES", "data": [["a\u0000", "\u00e9"]]},
        ]
    }
    request = decode_infer_request(json.dumps(header).encode(), None)
    assert_same(request.inputs["x"], np.arange(1, 7, dtype=np.int32).reshape(2, 3))
    assert_same(request.inputs["y"], np.array([1, 2, 3, 4, 5, 6.5]).reshape(3, 2))
    assert_same(request.inputs["s"], np.array([[b"a\x00", "é".encode()]], dtype=object))


def test_decoded_arrays_are_writable_and_native() -> None:
    body, header_length = client_body([client_input("x", SAMPLES["FP32"], binary=True)])
    array = decode_infer_request(body, header_length).inputs["x"]
    assert array.flags.writeable and array.flags.aligned and array.flags.c_contiguous
    array *= 2  # the engine may normalise in place


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),  # what tritonclient sends for deflate
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),  # raw deflate
        ("GZIP", lambda data: gzip.compress(data[:10]) + gzip.compress(data[10:])),  # two members
    ],
    ids=["gzip", "deflate-zlib", "deflate-raw", "gzip-multimember"],
)
def test_compressed_bodies(encoding: str, compress) -> None:
    inputs = [client_input("x", SAMPLES["FP32"], True), client_input("t", SAMPLES["BYTES"], False)]
    body, header_length = client_body(inputs)

    request = decode_infer_request(compress(body), header_length, content_encoding=encoding)

    assert_same(request.inputs["x"], SAMPLES["FP32"])
    assert_same(request.inputs["t"], SAMPLES["BYTES"])


def test_identity_encoding_is_accepted() -> None:
    body, header_length = client_body([client_input("x", SAMPLES["FP32"], True)])
    assert decode_infer_request(body, header_length, content_encoding="identity").inputs["x"].shape == (2, 3)


# ------------------------------------------------------------------ responses read by the real client


def outputs_for_response() -> list[tuple[str, np.ndarray, bool]]:
    return [
        ("probabilities", SAMPLES["FP32"], True),
        ("exit_index", SAMPLES["INT64"], False),
        ("target_met", SAMPLES["BOOL"], True),
        ("estimate", SAMPLES["FP16"], False),
        ("label", SAMPLES["BYTES"], True),
        ("label_text", SAMPLES["BYTES"], False),
        ("nothing", np.zeros((0, 2), dtype=np.float32), True),
    ]


def test_mixed_response_read_by_real_client() -> None:
    outputs = outputs_for_response()
    body, headers = encode_infer_response("mnist", "3", "req-7", outputs, parameters={"delta": 0.9})

    assert headers["Content-Type"] == "application/octet-stream"
    result = httpclient.InferResult.from_response_body(body, header_length=int(headers[HEADER_LENGTH]))

    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("mnist", "3", "req-7")
    assert response["parameters"] == {"delta": 0.9}
    assert [o["name"] for o in response["outputs"]] == [name for name, _, _ in outputs]
    for name, array, _ in outputs:
        got = result.as_numpy(name)
        if array.dtype == object:
            # the client yields bytes for binary BYTES and str for JSON BYTES
            expected = [[_as(item, got.flat[0]) for item in row] for row in array.tolist()]
            assert got.tolist() == expected
        else:
            assert_same(got, array)


def _as(item: bytes, like: object) -> object:
    return item.decode() if isinstance(like, str) else item


def test_pure_json_response() -> None:
    body, headers = encode_infer_response("m", None, None, [("y", SAMPLES["FP32"], False)])

    assert headers == {"Content-Type": "application/json"}
    document = json.loads(body)
    assert "model_version" not in document and "id" not in document
    assert document["outputs"][0] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [2, 3],
        "data": SAMPLES["FP32"].ravel().tolist(),
    }
    result = httpclient.InferResult.from_response_body(body)
    assert_same(result.as_numpy("y"), SAMPLES["FP32"])


def test_response_converts_big_endian_and_strided_arrays() -> None:
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    strided = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    body, headers = encode_infer_response("m", "1", None, [("a", big_endian, True), ("b", strided, True)])
    result = httpclient.InferResult.from_response_body(body, header_length=int(headers[HEADER_LENGTH]))
    assert result.as_numpy("a").tolist() == big_endian.tolist()
    assert result.as_numpy("b").tolist() == strided.tolist()


def test_response_round_trips_through_our_decoder() -> None:
    """Our encoder's layout is the request layout too: a response body decodes as a request body."""
    body, headers = encode_infer_response("m", "1", "id", [("x", SAMPLES["FP32"], True)])
    header = json.loads(body[: int(headers[HEADER_LENGTH])])
    header["inputs"] = header.pop("outputs")
    head = json.dumps(header).encode()
    request = decode_infer_request(head + body[int(headers[HEADER_LENGTH]) :], str(len(head)))
    assert_same(request.inputs["x"], SAMPLES["FP32"])


def test_json_bytes_output_that_is_not_text_is_refused() -> None:
    array = np.array([b"\xff"], dtype=object)
    with pytest.raises(ProtocolError, match="output 'blob'.*binary_data=true"):
        encode_infer_response("m", None, None, [("blob", array, False)])


def test_numpy_to_datatype() -> None:
    for datatype, dtype in DATATYPE_TO_NUMPY.items():
        assert numpy_to_datatype(np.zeros(1, dtype)) == datatype
    assert numpy_to_datatype(np.zeros(1, ">f4")) == "FP32"
    assert numpy_to_datatype(np.array([b"a"], dtype=object)) == "BYTES"
    assert numpy_to_datatype(np.array(["a"])) == "BYTES"
    with pytest.raises(TypeError, match="complex128"):
        numpy_to_datatype(np.zeros(1, np.complex128))


# ------------------------------------------------------------------ malformed requests


def _input(**overrides) -> dict:
    tensor = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    tensor.update(overrides)
    return {key: value for key, value in tensor.items() if value is not None}


def _json_body(*inputs: dict, **top) -> tuple[bytes, None]:
    return json.dumps({"inputs": list(inputs), **top}).encode(), None


def _binary_input(**parameters) -> dict:
    return {"name": "x", "shape": [2], "datatype": "FP32", "parameters": parameters}


def _client_binary_body() -> tuple[bytes, str]:
    return client_body([client_input("x", np.ones((2, 2), np.float32), binary=True)])


_CLIENT_BODY, _CLIENT_LENGTH = _client_binary_body()  # 16 bytes of tensor after the JSON

MALFORMED = {
    "invalid-json": ((b'{"inputs": [', None), "not valid JSON"),
    "json-not-object": ((b"[1, 2]", None), "must be a JSON object, got array"),
    "not-utf8": ((b'{"id": "\xff"}', None), "not valid UTF-8"),
    "header-length-not-int": ((_CLIENT_BODY, "12abc"), f"{HEADER_LENGTH} must be an integer"),
    "header-length-negative": ((_CLIENT_BODY, "-3"), "must not be negative"),
    "header-length-beyond-body": ((_CLIENT_BODY, str(len(_CLIENT_BODY) + 1)), "body has only"),
    "header-length-lies-short": (
        (_CLIENT_BODY, str(int(_CLIENT_LENGTH) - 4)),
        f"per {HEADER_LENGTH}) is not valid JSON",
    ),
    "header-length-lies-long": (
        (_CLIENT_BODY, str(int(_CLIENT_LENGTH) + 4)),
        f"per {HEADER_LENGTH}) is not valid",
    ),
    "truncated-binary": ((_CLIENT_BODY[:-3], _CLIENT_LENGTH), "sum to 16 bytes but 13 bytes follow"),
    "trailing-bytes": ((_CLIENT_BODY + b"\0", _CLIENT_LENGTH), "sum to 16 bytes but 17 bytes follow"),
    "binary-without-header": ((_CLIENT_BODY[: int(_CLIENT_LENGTH)], None), "no Inference-Header"),
    "missing-inputs": ((b'{"id": "a"}', None), "no 'inputs'"),
    "empty-inputs": ((b'{"inputs": []}', None), "non-empty JSON array"),
    "input-not-object": (_json_body("x"), "inputs[0] must be a JSON object"),
    "missing-name": (_json_body(_input(name=None)), "inputs[0]: 'name' is missing"),
    "missing-shape": (_json_body(_input(shape=None)), "input 'x': 'shape' is missing"),
    "missing-datatype": (_json_body(_input(datatype=None)), "input 'x': 'datatype' is missing"),
    "unknown-datatype": (_json_body(_input(datatype="FLOAT32")), "unknown datatype 'FLOAT32'"),
    "negative-dim": (_json_body(_input(shape=[-1, 2])), "negative dimension -1"),
    "fractional-dim": (_json_body(_input(shape=[2.5])), "non-integer dimension 2.5"),
    "count-mismatch": (_json_body(_input(shape=[3])), "'data' has 2 elements but shape [3] needs 3"),
    "nested-count-mismatch": (_json_body(_input(shape=[2, 2], data=[[1.0], [2.0]])), "has 2 elements"),
    "ragged-data": (_json_body(_input(shape=[3], data=[[1.0, 2.0], [3.0]])), "not rectangular"),
    "data-not-array": (_json_body(_input(shape=[], data=1.0)), "'data' must be a JSON array"),
    "string-for-fp32": (_json_body(_input(data=[1.0, "2"])), 'element 1 is string "2"'),
    "null-for-fp32": (_json_body(_input(data=[None, 2.0])), "element 0 is null"),
    "bool-for-fp32": (_json_body(_input(data=[True, False])), "element 0 is boolean"),
    "float-for-int64": (_json_body(_input(datatype="INT64", data=[1, 2.5])), "must hold integers"),
    "int-for-bool": (_json_body(_input(datatype="BOOL", data=[0, 1])), "must hold booleans"),
    "int8-out-of-range": (_json_body(_input(datatype="INT8", data=[1, 300])), "outside the INT8 range"),
    "huge-int": (_json_body(_input(datatype="UINT64", data=[1, 2**70])), "outside the UINT64 range"),
    "fp16-overflow": (_json_body(_input(datatype="FP16", data=[1.0, 1e6])), "too large for FP16"),
    "number-for-bytes": (_json_body(_input(datatype="BYTES", data=["a", 3])), "element 1 must be a string"),
    "no-data-no-binary": (_json_body(_input(data=None)), "neither 'data' nor parameters.binary_data_size"),
    "data-and-binary": (
        _json_body(_input(parameters={"binary_data_size": 8})),
        "both 'data' and 'binary_data_size'",
    ),
    "binary-size-negative": (crafted({"inputs": [_binary_input(binary_data_size=-8)]}), "non-negative"),
    "binary-size-string": (crafted({"inputs": [_binary_input(binary_data_size="8")]}), "non-negative"),
    "binary-size-lies": (
        crafted({"inputs": [_binary_input(binary_data_size=6)]}, b"\0" * 6),
        "binary_data_size is 6 bytes but shape [2] of FP32 needs 8",
    ),
    "binary-sizes-sum-lies": (
        crafted({"inputs": [_binary_input(binary_data_size=8)]}, b"\0" * 12),
        "sum to 8 bytes but 12 bytes follow",
    ),
    "bool-binary-not-0-1": (
        crafted(
            {"inputs": [{**_binary_input(binary_data_size=2), "datatype": "BOOL"}]},
            b"\x01\x02",
        ),
        "other than 0 and 1",
    ),
    "bytes-element-overruns": (
        crafted(
            {"inputs": [{**_binary_input(binary_data_size=9), "datatype": "BYTES", "shape": [1]}]},
            b"\x09\0\0\0abcde",
        ),
        "element 0 claims 9 bytes but only 5 remain",
    ),
    "bytes-leftover": (
        crafted(
            {"inputs": [{**_binary_input(binary_data_size=7), "datatype": "BYTES", "shape": [1]}]},
            b"\x01\0\0\0abc",
        ),
        "2 bytes left over after 1 BYTES elements",
    ),
    "bytes-huge-shape": (
        crafted(
            {"inputs": [{**_binary_input(binary_data_size=4), "datatype": "BYTES", "shape": [10**6, 10**6]}]},
            b"\0\0\0\0",
        ),
        "cannot hold 1000000000000 elements",
    ),
    "dimension-above-int32": (
        crafted({"inputs": [{**_binary_input(binary_data_size=0), "shape": [0, 2**40]}]}, b""),
        "holds a dimension above 2147483647",
    ),
    "too-many-axes": (
        crafted({"inputs": [{**_binary_input(binary_data_size=0), "shape": [0] + [1] * 20}]}, b""),
        "at most 16 are accepted",
    ),
    "duplicate-input": (_json_body(_input(), _input()), "input 'x': duplicate input name"),
    "id-not-string": (_json_body(_input(), id=5), "'id' must be a string, got number"),
    "request-parameter-not-scalar": (
        _json_body(_input(), parameters={"delta": [0.9]}),
        "request: parameter 'delta' must be a string, number or boolean, got array",
    ),
    "input-parameter-not-scalar": (
        _json_body(_input(parameters={"scale": {"a": 1}})),
        "input 'x': parameter 'scale' must be a string, number or boolean, got object",
    ),
    "parameters-not-object": (_json_body(_input(), parameters=[1]), "'parameters' must be a JSON object"),
    "binary-data-output-not-bool": (
        _json_body(_input(), parameters={"binary_data_output": "yes"}),
        "'binary_data_output' must be a boolean",
    ),
    "outputs-not-array": (_json_body(_input(), outputs={"name": "y"}), "'outputs' must be a JSON array"),
    "output-without-name": (_json_body(_input(), outputs=[{"parameters": {}}]), "outputs[0]: 'name'"),
    "output-twice": (_json_body(_input(), outputs=[{"name": "y"}, {"name": "y"}]), "requested twice"),
    "output-binary-not-bool": (
        _json_body(_input(), outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
        "output 'y': parameter 'binary_data' must be a boolean",
    ),
    "output-classification": (
        _json_body(_input(), outputs=[{"name": "y", "parameters": {"classification": 3}}]),
        "classification extension is not supported",
    ),
    "input-shared-memory": (
        _json_body(_input(data=None, parameters={"shared_memory_region": "r"})),
        "shared memory extension is not supported",
    ),
}


@pytest.mark.parametrize(("case", "expected"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_is_refused_with_a_precise_message(case, expected: str) -> None:
    body, header_length = case
    with pytest.raises(ProtocolError) as error:
        decode_infer_request(body, header_length)
    assert expected in str(error.value)


def test_zip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * (8 << 20))  # 8 MiB of zeros in ~8 KiB
    with pytest.raises(ProtocolError, match="inflates beyond the limit of 1048576 bytes"):
        decode_infer_request(bomb, None, content_encoding="gzip", max_body_bytes=1 << 20)
    deflate_bomb = zlib.compress(b"\0" * (8 << 20))
    with pytest.raises(ProtocolError, match="deflate request body inflates beyond"):
        decode_infer_request(deflate_bomb, None, content_encoding="deflate", max_body_bytes=1 << 20)


@pytest.mark.parametrize(
    ("body", "encoding", "kwargs", "expected"),
    [
        (b"x" * 100, None, {"max_body_bytes": 99}, "request body is 100 bytes; the limit is 99"),
        (b"{}", "br", {}, "unsupported Content-Encoding 'br'"),
        (b"not gzip at all", "gzip", {}, "not valid gzip data"),
        (gzip.compress(b'{"inputs": []}')[:-6], "gzip", {}, "gzip request body is truncated"),
        (zlib.compress(b"{}") + b"junk", "deflate", {}, "4 bytes of garbage after the deflate stream"),
    ],
    ids=["too-large", "unsupported-encoding", "corrupt-gzip", "truncated-gzip", "deflate-trailing-junk"],
)
def test_bad_body_encoding(body: bytes, encoding: str | None, kwargs: dict, expected: str) -> None:
    with pytest.raises(ProtocolError) as error:
        decode_infer_request(body, None, content_encoding=encoding, **kwargs)
    assert expected in str(error.value)


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


# ------------------------------------------------------------------ property


@settings(max_examples=60, deadline=None)
@given(
    array=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    ),
    binary=st.booleans(),
)
def test_any_fp32_array_survives_client_encode_then_decode(array: np.ndarray, binary: bool) -> None:
    body, header_length = client_body([client_input("x", array, binary)])

    decoded = decode_infer_request(body, header_length).inputs["x"]

    assert decoded.shape == array.shape and decoded.dtype == np.float32
    if binary:
        assert decoded.tobytes() == array.tobytes()  # bit-exact, NaN payloads included
    else:
        assert np.array_equal(decoded, array, equal_nan=True)
        numbers = ~np.isnan(array)  # JSON has one NaN: its sign and payload cannot survive
        assert np.array_equal(np.signbit(decoded[numbers]), np.signbit(array[numbers]))  # -0.0 does


def test_request_dataclass_shape() -> None:
    request = decode_infer_request(*_json_body(_input()))
    assert isinstance(request, InferRequest)
    assert request.id is None and request.parameters == {} and request.outputs is None
