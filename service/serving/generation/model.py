"""A served generation bundle: decoder weights, exit heads, tables, tokenizer, chat template, scheduler.

Loaded with torch (the `llm` extra), never with transformers; `runner` says what computes the
layers and heads (ONNX Runtime sessions over the same weights by default, or the torch modules).
`device` is the CUDA switch: every tensor of the decoder and its caches lives there; the exit
decisions run on the host on one row of head logits per sequence.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from exitserve.calibration import Calibration
from exitserve.errors import BadBundle
from exitserve.models.bundle import Bundle, load_bundle
from exitserve.models.llm.heads import ExitHeads
from exitserve.models.llm.llama import load_llama
from exitserve.models.llm.precision import Precision, int8_activations_for
from exitserve.service.serving.generation.decoder import MultiExitDecoder
from exitserve.service.serving.generation.lookup import DEFAULT_NGRAM
from exitserve.service.serving.generation.metrics import GenerationMetrics
from exitserve.service.serving.generation.runners import RunnerKind
from exitserve.service.serving.generation.scheduler import Scheduler
from exitserve.service.serving.generation.stream import MAX_DRAFT
from exitserve.service.settings import DEFAULT_LOOKUP_HISTORY

log = logging.getLogger("exitserve.generation")


def load_heads(bundle: Bundle, width: int, eps: float) -> ExitHeads | None:
    spec = bundle.manifest.generation_spec
    if spec.heads is None or len(spec.exit_layers) < 2:
        return None
    from safetensors.torch import load_file

    state = load_file(str(bundle.path / spec.heads))
    hidden = int(state["heads.0.up.weight"].shape[0])
    outside = state.get("heads.0.outside.weight")  # absent from heads saved before the outside estimate
    heads = ExitHeads(width, hidden, eps, state["vocab"], len(spec.exit_layers) - 1,
                      outside_rows=int(outside.shape[0]) if outside is not None else 0)
    heads.load_state_dict(state)
    return heads.eval().requires_grad_(False)


class ChatTemplate:
    """The bundle's Jinja chat template, rendered in a sandbox (as transformers renders it)."""

    def __init__(self, source: str, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                    eos_token=self.eos_token)


END_OF_TEXT_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>")


class GenerationModel:
    def __init__(self, bundle: Bundle, metrics_registry, *, device: str = "cpu", kv_strategy: str = "recompute",
                 max_running: int = 16, queue_limit: int = 64, dtype: torch.dtype = torch.float32,
                 runner: RunnerKind = "onnxruntime", threads: int = 1, precision: Precision = "float32",
                 int8_activations: bool = False, fuse_segments: bool = True, lookup_ngram: int = DEFAULT_NGRAM,
                 lookup_max_batch: int = 1, kv_pool: bool = True, lookup_history: int = DEFAULT_LOOKUP_HISTORY):
        spec = bundle.manifest.generation_spec
        if spec is None:
            raise BadBundle(f"{bundle.path}: not a text-generation bundle")
        self.bundle, self.spec, self.name = bundle, spec, bundle.manifest.name
        self.model = load_llama(bundle.path, dtype=dtype, device=device)
        config = self.model.config
        heads = load_heads(bundle, config.hidden_size, config.rms_norm_eps)
        if heads is not None:
            heads = heads.to(device=device, dtype=dtype)
        calibration = None
        if heads is not None:
            if bundle.calibration is None:
                raise BadBundle(f"{bundle.path / 'calibration.json'}: a bundle with exit heads needs its tables")
            try:
                calibration = Calibration.from_dict(bundle.calibration, num_exits=bundle.manifest.num_exits)
            except ValueError as exc:
                raise BadBundle(f"{bundle.path / 'calibration.json'}: {exc}") from exc
        self.calibration = calibration
        self.compute_fractions = bundle.manifest.compute_fractions()
        self.decoder = MultiExitDecoder(self.model, heads, spec.exit_layers, calibration, kv_strategy=kv_strategy,
                                        compute_fractions=self.compute_fractions, runner=runner, threads=threads,
                                        precision=precision, int8_activations=int8_activations,
                                        fuse_segments=fuse_segments, lookup_ngram=lookup_ngram,
                                        lookup_max_batch=lookup_max_batch, pool_slots=max_running if kv_pool else 0,
                                        lookup_history=lookup_history,
                                        # what a request may hold: its context and the drafts in flight
                                        pool_capacity=spec.max_context + 2 * MAX_DRAFT)
        self.precision = precision
        # int8 activations round differently for one row and for several: exact mode would not be exact
        self.exact_mode = not int8_activations_for(precision, int8_activations)
        self.tokenizer = Tokenizer.from_file(str(bundle.path / spec.tokenizer))
        # Tokens that end a generation: the bundle's eos ids, and the tokenizer's end-of-text token
        # (a base-model habit: SmolLM2-Instruct ends with <|im_end|> but emits <|endoftext|> off-template).
        end_of_text = {self.tokenizer.token_to_id(t) for t in END_OF_TEXT_TOKENS} - {None}
        self.stop_ids: frozenset[int] = frozenset(spec.eos_ids) | frozenset(i for i in end_of_text if i is not None)
        token = self.tokenizer.id_to_token
        self.chat_template = None
        if spec.chat_template:
            self.chat_template = ChatTemplate((bundle.path / spec.chat_template).read_text(),
                                              (token(spec.bos_id) or "") if spec.bos_id is not None else "",
                                              (token(spec.eos_ids[0]) or "") if spec.eos_ids else "")
        self.metrics = GenerationMetrics(metrics_registry, self.name, bundle.manifest.num_exits)
        self.scheduler = Scheduler(self.decoder, self.metrics, max_running=max_running, queue_limit=queue_limit,
                                   model=self.name)
        self.ready = False

    @property
    def exit_layers(self) -> list[int]:
        return list(self.spec.exit_layers)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def warm_up(self) -> None:
        """One short greedy generation, then what a draft row costs on this machine (lookup drafts are
        as long as pays: `MultiExitDecoder.measure_row_cost`)."""
        seq = self.decoder.new_sequence(self.encode("Hello") or [0], capacity=8, mode="full")
        self.decoder.step([seq])
        self.decoder.release(seq)
        if self.decoder.lookup_ngram:
            cost = self.decoder.measure_row_cost()
            log.info("%s: a draft row costs %.3f of a one-row decoding step", self.name, cost)

    def start(self) -> None:
        """Warm up and start the engine thread."""
        self.warm_up()
        self.scheduler.start()
        self.ready = True

    def stop(self, timeout: float) -> bool:
        self.ready = False
        return self.scheduler.close(timeout)


def load_generation_model(path: Path, metrics_registry, **options) -> GenerationModel:
    return GenerationModel(load_bundle(path), metrics_registry, **options)
