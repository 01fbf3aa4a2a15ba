"""The bundle: a directory holding per-segment graphs, a manifest and calibration tables.

This module must stay importable without torch: the server loads bundles with it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from exitserve.errors import BadBundle

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
CALIBRATION_FILE = "calibration.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextSpec(_Strict):
    """Text models: the graph takes token ids [batch, sequence]; the server tokenises with this."""

    tokenizer: str = Field(description="bundle-relative tokenizer.json, loaded with the `tokenizers` package")
    max_length: int = Field(gt=0, description="longest token sequence accepted, special tokens included")
    pad_id: int = Field(0, ge=0, description="padding token id; the graph masks positions holding it")
    vocab_size: int = Field(gt=0)


class InputSpec(_Strict):
    name: str
    shape: list[int] = Field(description="-1 marks the batch axis (and any other variable axis)")
    dtype: Literal["float32", "float16", "int64", "int32"] = "float32"
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    text: TextSpec | None = None

    @model_validator(mode="after")
    def _text_takes_token_ids(self) -> InputSpec:
        if self.text is not None and (self.dtype not in ("int64", "int32") or len(self.shape) != 2):
            raise ValueError("a text input must be integer token ids of shape [-1, -1]")
        return self


class SegmentSpec(_Strict):
    file: str
    inputs: list[str]
    outputs: list[str] = Field(description="tensors passed on to the next segment, then the exit logits")
    logits: str = Field(description="name of the output holding this segment's exit logits")
    flops: int = Field(ge=0, description="measured FLOPs per sample of the segment and its exit head")
    torchscript: str | None = Field(None, description="optional TorchScript twin of `file`, for the torch runner")
    features: str | None = Field(None, description="first segment only: the output holding pooled statistics of its "
                                 "hidden state, read by the input guard (models.features)")

    @property
    def state_outputs(self) -> list[str]:
        return [name for name in self.outputs if name not in (self.logits, self.features)]


class SpanSpec(_Strict):
    """Segments first..last as one graph computing only segment `last`'s exit head (models.spans):
    it takes segment `first`'s inputs and gives segment `last`'s outputs."""

    first: int = Field(ge=0)
    last: int = Field(ge=0)
    file: str


class ExitSpec(_Strict):
    index: int = Field(ge=0)
    after_segment: int = Field(ge=0)
    cumulative_flops: int = Field(ge=0)


class Provenance(_Strict):
    exitserve_version: str
    command: str = ""
    data_fingerprint: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class GenerationSpec(_Strict):
    """Generation bundles (decoder LLMs, task `text-generation`): the torch weights, the exits'
    layers and heads, the tokenizer and chat template. Segment k is layers
    (exit_layers[k-1], exit_layers[k]]; every segment reads the one weights file and keeps one
    KV cache per layer (`kv_cache`)."""

    config: str = Field(description="bundle-relative config.json of the Llama decoder")
    weights: str = Field(description="bundle-relative safetensors of the decoder (checkpoint key names)")
    tokenizer: str = Field(description="bundle-relative tokenizer.json (`tokenizers` package)")
    chat_template: str | None = Field(None, description="bundle-relative Jinja chat template")
    heads: str | None = Field(None, description="bundle-relative safetensors of the exit heads (None: no early exits)")
    exit_layers: list[int] = Field(description="0-based decoder layer after which each exit sits; the last is the final layer")
    head_vocab_size: int = Field(0, ge=0, description="tokens the early-exit heads predict over (a restricted vocabulary)")
    bos_id: int | None = None
    eos_ids: list[int] = Field(default_factory=list)
    max_context: int = Field(gt=0)
    kv_cache: dict[str, Any] = Field(default_factory=dict, description="per layer: keys/values [kv_heads, positions, head_dim]")


class Manifest(_Strict):
    schema_version: int
    name: str
    version: str = "1"
    task: Literal["image-classification", "text-classification", "classification", "text-generation"] = "classification"
    input: InputSpec
    labels: list[str]
    segments: list[SegmentSpec]
    exits: list[ExitSpec]
    sha256: dict[str, str]
    created_by: Provenance
    generation: GenerationSpec | None = None
    spans: list[SpanSpec] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        if not self.segments:
            raise ValueError("a bundle needs at least one segment")
        if len(self.exits) != len(self.segments):
            raise ValueError(f"{len(self.exits)} exits for {len(self.segments)} segments: one exit per segment")
        for position, exit_spec in enumerate(self.exits):
            if exit_spec.index != position or exit_spec.after_segment != position:
                raise ValueError(f"exit {position} must have index {position} and after_segment {position}")
        running = 0
        for segment, exit_spec in zip(self.segments, self.exits, strict=True):
            running += segment.flops
            if exit_spec.cumulative_flops != running:
                raise ValueError(f"exit {exit_spec.index}: cumulative_flops {exit_spec.cumulative_flops} != {running}")
        if self.segments[0].inputs != [self.input.name]:
            raise ValueError(f"segment 0 must take the model input {self.input.name!r}")
        for k in range(1, len(self.segments)):
            passed = self.segments[k - 1].state_outputs
            if self.segments[k].inputs != passed:
                raise ValueError(f"segment {k} inputs {self.segments[k].inputs} != segment {k - 1} outputs {passed}")
        spans = self.spans or []
        for span in spans:
            if not span.first < span.last < len(self.segments):
                raise ValueError(f"span {span.first}-{span.last}: needs first < last < {len(self.segments)} (the segments)")
        if len({(span.first, span.last) for span in spans}) != len(spans):
            raise ValueError("spans: the same span is listed twice")
        tokenizer = [self.input.text.tokenizer] if self.input.text else []
        generation = self._generation_files()
        span_files = [span.file for span in spans]
        for file in [*self.sha256, *tokenizer, *generation, *span_files, *(f for s in self.segments for f in (s.file, s.torchscript) if f)]:
            parts = PurePosixPath(file).parts
            if not parts or PurePosixPath(file).is_absolute() or ".." in parts or "\\" in file:
                raise ValueError(f"file path {file!r} escapes the bundle directory (relative paths inside it only)")
        if self.task == "text-generation":
            if self.labels:
                raise ValueError("a text-generation bundle has no labels (its classes are the vocabulary)")
            if self.generation is None:
                raise ValueError("a text-generation bundle needs a 'generation' section")
            layers = self.generation.exit_layers
            if len(layers) != len(self.exits):
                raise ValueError(f"{len(layers)} exit layers for {len(self.exits)} exits")
            # strictly increasing, except that an early exit may sit after the final layer too (a
            # restricted-vocabulary head that answers without the full LM head), just before the last exit
            if any(b <= a for a, b in zip(layers[:-1], layers[1:-1], strict=False)) or (
                    len(layers) > 1 and layers[-1] < layers[-2]):
                raise ValueError("exit_layers must be strictly increasing (the final layer may repeat once, last)")
        elif len(set(self.labels)) != len(self.labels) or not self.labels:
            raise ValueError("labels must be non-empty and unique")
        return self

    @property
    def generation_spec(self) -> GenerationSpec:
        """The generation section of a text-generation bundle (the validator guarantees it there)."""
        if self.generation is None:
            raise BadBundle(f"bundle {self.name!r} is not a text-generation bundle")
        return self.generation

    def _generation_files(self) -> list[str]:
        if (self.task == "text-generation") != (self.generation is not None):
            raise ValueError("task text-generation and the `generation` section go together")
        g = self.generation
        return [f for f in (g.config, g.weights, g.tokenizer, g.chat_template, g.heads) if f] if g else []

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def full_flops(self) -> int:
        return self.exits[-1].cumulative_flops

    def compute_fractions(self) -> list[float]:
        full = self.full_flops or 1
        return [e.cumulative_flops / full for e in self.exits]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(directory: Path) -> list[str]:
    """Every file of a bundle except the manifest, as sorted relative POSIX paths."""
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    )


def checksums(directory: Path) -> dict[str, str]:
    return {name: sha256_of(directory / name) for name in bundle_files(directory)}


def write_manifest(directory: Path, manifest_fields: dict[str, Any]) -> Manifest:
    """Validate and write manifest.json, filling sha256 from the files now in the directory."""
    fields = dict(manifest_fields)
    fields["sha256"] = checksums(directory)
    manifest = Manifest.model_validate(fields)
    # Unset optional fields stay out of the file, so readers that predate them still load it.
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json", exclude_none=True), indent=2) + "\n")
    return manifest


def refresh_checksums(directory: Path) -> Manifest:
    """Re-sign a bundle after a file changed on purpose (e.g. `exitserve calibrate`)."""
    raw = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    return write_manifest(Path(directory), raw)


class Bundle:
    """A verified bundle on disk. Construct with `load_bundle`."""

    def __init__(self, path: Path, manifest: Manifest, calibration: dict[str, Any] | None):
        self.path = path
        self.manifest = manifest
        self.calibration = calibration

    def segment_path(self, index: int) -> Path:
        return self.path / self.manifest.segments[index].file

    def span_paths(self) -> dict[tuple[int, int], Path]:
        """(first, last) -> graph of every span the bundle carries (none for bundles built before spans)."""
        return {(span.first, span.last): self.path / span.file for span in self.manifest.spans or []}

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({m.name!r} v{m.version}, {m.num_exits} exits, {self.path})"


def validation_summary(exc: ValidationError) -> str:
    """A pydantic error as one line, `field.path: message (got value)` per problem: pydantic's own text
    spans several lines and links to its documentation, which CLI errors and 422 answers should not."""
    parts = []
    for error in exc.errors():
        where = ".".join(map(str, error["loc"])) or "(top level)"
        got = repr(error.get("input"))
        parts.append(f"{where}: {error['msg']}" + (f" (got {got})" if len(got) <= 40 else ""))
    return "; ".join(parts)


def load_bundle(path: str | Path, *, require_calibration: bool = False) -> Bundle:
    """Read and verify a bundle: schema, file list and every checksum. Raises BadBundle."""
    directory = Path(path)
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise BadBundle(f"{directory}: not a bundle directory")
    if not manifest_path.is_file():
        raise BadBundle(f"{manifest_path}: missing manifest")
    try:
        raw = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BadBundle(f"{manifest_path}: not valid JSON ({exc})") from exc
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BadBundle(f"{manifest_path}: invalid manifest: {validation_summary(exc)}") from exc

    on_disk = set(bundle_files(directory))
    listed = set(manifest.sha256)
    for name in sorted(listed - on_disk):
        raise BadBundle(f"{directory / name}: listed in the manifest but missing")
    for name in sorted(on_disk - listed):
        raise BadBundle(f"{directory / name}: not listed in the manifest (unexpected file)")
    for segment in manifest.segments:
        for file in filter(None, (segment.file, segment.torchscript)):
            if file not in listed:
                raise BadBundle(f"{directory / file}: segment file has no checksum in the manifest")
    for span in manifest.spans or []:
        if span.file not in listed:
            raise BadBundle(f"{directory / span.file}: span file has no checksum in the manifest")
    generation_files = manifest._generation_files()
    for file in generation_files:
        if file not in listed:
            raise BadBundle(f"{directory / file}: generation file has no checksum in the manifest")
    if manifest.input.text and manifest.input.text.tokenizer not in listed:
        raise BadBundle(f"{directory / manifest.input.text.tokenizer}: tokenizer file has no checksum in the manifest")
    for name in sorted(listed):
        actual = sha256_of(directory / name)
        if actual != manifest.sha256[name]:
            raise BadBundle(
                f"{directory / name}: sha256 mismatch (manifest {manifest.sha256[name][:12]}…, file {actual[:12]}…)"
            )

    calibration = None
    calibration_path = directory / CALIBRATION_FILE
    if calibration_path.is_file():
        try:
            calibration = json.loads(calibration_path.read_text())
        except json.JSONDecodeError as exc:
            raise BadBundle(f"{calibration_path}: not valid JSON ({exc})") from exc
        exits = calibration.get("exits") if isinstance(calibration, dict) else None
        if not isinstance(exits, list) or len(exits) != manifest.num_exits:
            count = len(exits) if isinstance(exits, list) else "no"
            raise BadBundle(f"{calibration_path}: {count} exit tables for {manifest.num_exits} exits")
    elif require_calibration:
        raise BadBundle(f"{calibration_path}: missing (run `exitserve calibrate`)")
    return Bundle(directory, manifest, calibration)
