"""One dataplane for every protocol: validate a batch, queue it, await its decisions."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exitserve.calibration import POLICIES
from exitserve.calibration.document import Deltas, normalise_deltas
from exitserve.calibration.reasons import REASON_NAMES
from exitserve.errors import ClientGone, InvalidInput, Overloaded, PayloadTooLarge, Timeout
from exitserve.service.serving.batcher import ItemResult, WorkItem
from exitserve.service.serving.context import CLIENT_GONE, REQUEST_ID, RESERVATION
from exitserve.service.serving.repository import ModelRepository, ServedModel
from exitserve.service.serving.text_input import check_token_ids
from exitserve.service.settings import Settings


@dataclass
class Prediction:
    model: ServedModel
    result: ItemResult

    @property
    def compute_fraction(self) -> np.ndarray:
        return self.model.compute_fractions[self.result.exit_index]

    @property
    def labels(self) -> np.ndarray:
        return self.model.labels[self.result.class_index]

    @property
    def reasons(self) -> list[str | None]:
        """Why each answer carries no promise (None where target_met): calibration.reasons' names."""
        codes = self.result.reason
        if codes is None:
            return [None] * len(self.result.class_index)
        return [REASON_NAMES[code] for code in codes.tolist()]


class Dataplane:
    def __init__(self, repository: ModelRepository, settings: Settings):
        self.repository = repository
        self.settings = settings

    def model(self, name: str) -> ServedModel:
        return self.repository.get(name)

    def admit_early(self, model: ServedModel) -> None:
        """A fast 503 before the body is parsed when the model's queue has no room for any request."""
        if not model.ready:
            raise Overloaded(f"model {model.name!r} is not ready")
        if RESERVATION.get() is None:  # else the edge admitted it on its headers, room held
            model.batcher.check_room()

    # --- validation ---------------------------------------------------------------------------

    def check_inputs(self, model: ServedModel, x: np.ndarray, where: str = "inputs") -> np.ndarray:
        expected = model.sample_shape
        if x.ndim != len(expected) + 1 or any(e > 0 and e != g for e, g in zip(expected, x.shape[1:], strict=True)):
            raise InvalidInput(f"{where}: shape {list(x.shape)} does not match the model input [-1, {', '.join(map(str, expected))}]")
        if x.shape[0] == 0:
            raise InvalidInput(f"{where}: empty batch")
        if x.shape[0] > self.settings.max_request_samples:
            raise PayloadTooLarge(f"{where}: {x.shape[0]} samples exceed the limit of {self.settings.max_request_samples} per request")
        if x.dtype != model.input_dtype:
            # Casting between float widths is lossless enough, and between integer widths (token
            # ids) once the range is checked below; integers into a float model would silently
            # skip its input scaling (e.g. uint8 pixels where [0, 1] floats are expected), so refuse them.
            same_kind = x.dtype.kind == model.input_dtype.kind == "f" or (x.dtype.kind in "iu" and model.input_dtype.kind in "iu")
            if not same_kind:
                raise InvalidInput(f"{where}: dtype {x.dtype} given, the model takes {model.input_dtype} "
                                   f"({model.manifest.input.preprocessing or 'see the model metadata'})")
            if x.dtype.kind in "iu" and x.size and (x.min() < np.iinfo(model.input_dtype).min or x.max() > np.iinfo(model.input_dtype).max):
                raise InvalidInput(f"{where}: values out of the range of {model.input_dtype}")
            x = x.astype(model.input_dtype)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0].tolist()
            raise InvalidInput(f"{where}: NaN or infinity at index {bad}")
        if model.manifest.input.text is not None:
            check_token_ids(model.manifest.input.text, x, where)
        return np.ascontiguousarray(x)

    def check_texts(self, model: ServedModel, texts: Sequence[object], where: str = "texts") -> np.ndarray:
        """Tokenise a text model's input with the bundle's tokenizer; 4xx for anything a client got wrong."""
        if model.tokenizer is None:
            raise InvalidInput(f"{where}: model {model.name!r} takes tensors, not texts (send 'inputs')")
        if isinstance(texts, (list, tuple)) and len(texts) > self.settings.max_request_samples:
            raise PayloadTooLarge(f"{where}: {len(texts)} samples exceed the limit of {self.settings.max_request_samples} per request")
        return model.tokenizer.encode(texts, where)

    def check_deltas(self, delta: object, n: int, where: str = "delta") -> Deltas:
        """One target per sample, through the calibration package's one δ normaliser (numbers only:
        numpy would happily parse "0.9", b"0.9" or True into a target)."""
        value = self.settings.default_delta if delta is None else delta
        if type(value) is float and 0.0 < value <= 1.0:  # the usual case, one valid number: what normalise_deltas returns
            return Deltas.checked_elsewhere(np.full(n, value))
        try:
            return normalise_deltas(delta, n, default=self.settings.default_delta, where=where)
        except ValueError as exc:
            raise InvalidInput(_clip(str(exc))) from None

    def check_policy(self, model: ServedModel, policy: object, n: int, where: str = "policy") -> np.ndarray:
        name = self.settings.default_policy if policy is None else policy
        if not isinstance(name, str) or name not in POLICIES:
            raise InvalidInput(f"{where}: unknown policy {name!r}; choose from {', '.join(POLICIES)}")
        return np.full(n, name, dtype=object)

    # --- inference ----------------------------------------------------------------------------

    async def infer(
        self, model: ServedModel, x: np.ndarray, deltas: Deltas, policies: np.ndarray, want_probabilities: bool,
        ood_guard: bool = True,
    ) -> Prediction:
        """`ood_guard` False: answer without the input guard (where the bundle has one) for this request."""
        if not model.ready:
            raise Overloaded(f"model {model.name!r} is not ready")
        loop = asyncio.get_running_loop()
        item = WorkItem(
            x=x, deltas=deltas, policies=policies,
            want_probabilities=np.ones(len(x), bool) if want_probabilities else None,
            loop=loop, future=loop.create_future(),
            request_id=REQUEST_ID.get(),  # set by the edge middleware: decisions are recorded under it
            guarded=ood_guard,
        )
        gone = CLIENT_GONE.get()
        if gone is not None and gone.done() and not gone.cancelled():
            raise ClientGone("the client closed the connection before its request was queued")
        reservation = RESERVATION.get()
        if reservation is not None:
            reservation.release()  # the request's real size replaces the edge's estimate
        model.submit(item)  # a model retired by a reload hands the request on; QueueFull is a 503
        # A timer handle is much cheaper than asyncio.wait_for, which wraps the future in a task.
        timer = loop.call_later(self.settings.request_timeout_s, self._expire, model, item)

        def client_left(future: asyncio.Future) -> None:
            if not future.cancelled():
                self._abandon(model, item)

        if gone is not None:
            gone.add_done_callback(client_left)
        try:
            result = await item.future
        finally:
            timer.cancel()
            if gone is not None:
                gone.remove_done_callback(client_left)  # answered: the edge's cancel of `gone` schedules nothing
        return Prediction(model, result)

    def _abandon(self, model: ServedModel, item: WorkItem) -> None:
        """The client hung up: drop its queued work (not computed, no longer counted for admission)."""
        if not item.future.done():
            model.abandon(item)
            item.future.set_exception(ClientGone("the client closed the connection"))

    def _expire(self, model: ServedModel, item: WorkItem) -> None:
        if not item.future.done():
            model.abandon(item)  # the engine skips it if it has not started yet
            item.future.set_exception(Timeout(f"no answer within {self.settings.request_timeout_s:g} s"))


def _clip(message: str, limit: int = 300) -> str:
    """Error messages echo what the client sent: never megabytes of it."""
    return message if len(message) <= limit else message[: limit - 1] + "…"
