"""The baseline a user writes: FastAPI + uvicorn + one monolithic ONNX Runtime session, no batching.

    python benchmarks/plain_server.py runs/monolithic/last-exit.onnx --port 8100

`POST /predict` takes {"inputs": nested list} (JSON, parsed with orjson: a tuned baseline),
`POST /predict_pydantic` the same through a typed pydantic body (what FastAPI's tutorial leads to),
and `POST /predict_raw` raw float32 bytes with an `x-shape` header; all answer labels and class indices.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel


class PredictBody(BaseModel):
    inputs: list[list[list[list[float]]]]

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def create_app(model_path: str, threads: int) -> FastAPI:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[-1].name
    app = FastAPI()

    def answer(x: np.ndarray) -> Response:
        logits = session.run([output], {"input": x})[0]
        index = logits.argmax(1)
        return Response(orjson.dumps({"predictions": [{"label": LABELS[i], "class_index": int(i)} for i in index]}),
                        media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        x = np.asarray(orjson.loads(await request.body())["inputs"], dtype=np.float32)
        return answer(x)

    @app.post("/predict_pydantic")
    async def predict_pydantic(body: PredictBody) -> Response:
        # What FastAPI's tutorial leads to: a typed pydantic body, validated element by element.
        return answer(np.asarray(body.inputs, dtype=np.float32))

    @app.post("/predict_raw")
    async def predict_raw(request: Request) -> Response:
        shape = [int(s) for s in request.headers["x-shape"].split(",")]
        return answer(np.frombuffer(await request.body(), dtype=np.float32).reshape(shape))

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model, args.threads), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
