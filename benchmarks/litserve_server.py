"""LitServe peer for the serving benchmark: the monolithic last-exit ONNX graph behind LitServe's
dynamic batcher, given the same batching limits as exitserve (no torch involved).

    python benchmarks/litserve_server.py runs/monolithic/last-exit.onnx --port 8200 --max-batch-size 64

`POST /predict` takes {"inputs": nested list, a batch} or {"b64", "dtype", "shape"} raw tensors.
"""

from __future__ import annotations

import argparse
import base64

import litserve as ls
import numpy as np

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class MonolithicOnnxAPI(ls.LitAPI):
    def __init__(self, model_path: str, threads: int, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_path = model_path
        self.threads = threads

    def setup(self, device: str) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.model_path, so, providers=["CPUExecutionProvider"])
        self.sizes: list[int] = []  # one worker process handles one batch at a time

    def decode_request(self, request: dict) -> np.ndarray:
        raw = request["inputs"]
        if isinstance(raw, dict):
            return np.frombuffer(base64.b64decode(raw["b64"]), dtype=np.float32).reshape(raw["shape"])
        return np.asarray(raw, dtype=np.float32)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        self.sizes = [len(x) for x in inputs]
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input": x})[-1].argmax(1)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return np.split(output, np.cumsum(self.sizes)[:-1])

    def encode_response(self, output: np.ndarray) -> dict:
        return {"predictions": [{"label": LABELS[i], "class_index": int(i)} for i in output]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.0, help="seconds; exitserve's default window is 0")
    args = parser.parse_args()
    api = MonolithicOnnxAPI(args.model, args.threads, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")
