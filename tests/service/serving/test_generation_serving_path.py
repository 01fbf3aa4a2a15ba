"""The generation serving path loads a bundle without transformers, and bundles keep their checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from llm_support import write_tiny_generation_bundle

from exitserve.errors import BadBundle
from exitserve.models.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_tiny_generation_bundle(tmp_path_factory.mktemp("llm") / "tiny-llm")


def test_serving_a_generation_bundle_never_imports_transformers(bundle):
    code = (
        "import sys\n"
        "from exitserve.service.app import create_app\n"
        "from exitserve.service.settings import Settings\n"
        f"app = create_app(Settings(bundles=[{str(bundle)!r}]))\n"
        "model = app.state.generation.models['tiny-llm']\n"
        "model.start()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'gguf', 'accelerate')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_generation_manifest_lists_and_checks_every_file(bundle):
    loaded = load_bundle(bundle)
    spec = loaded.manifest.generation
    assert loaded.manifest.task == "text-generation" and spec.exit_layers == [1, 3, 5]
    assert {spec.weights, spec.config, spec.tokenizer, spec.chat_template, spec.heads, "calibration.json"} <= set(
        loaded.manifest.sha256)
    assert loaded.manifest.compute_fractions()[-1] == 1.0
    assert 0 < loaded.manifest.compute_fractions()[0] < loaded.manifest.compute_fractions()[1] < 1


def test_tampered_heads_fail_loading(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with (copy / "heads.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(BadBundle, match="heads.safetensors: sha256 mismatch"):
        load_bundle(copy)


def test_generation_section_is_required_for_the_task(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["generation"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadBundle, match="text-generation and the `generation` section go together"):
        load_bundle(copy)


@pytest.mark.parametrize("layers, ok", [([1, 5, 5], True), ([1, 3, 5], True), ([3, 3, 5], False), ([1, 5, 3], False)])
def test_exit_layers_increase_and_only_the_final_layer_may_repeat(bundle, layers, ok):
    """An early exit after the final layer (restricted head instead of the full LM head) is allowed, once, last."""
    from exitserve.models.bundle import Manifest

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["generation"]["exit_layers"] = layers
    if ok:
        Manifest.model_validate(manifest)
    else:
        with pytest.raises(ValueError, match="strictly increasing"):
            Manifest.model_validate(manifest)


def test_auto_runner_is_onnxruntime_on_cpu_and_torch_on_cuda_and_a_choice_stands():
    from exitserve.service.serving.generation.repository import choose_runner

    assert choose_runner("auto", "cpu") == "onnxruntime"
    assert choose_runner("auto", "cuda") == "torch"
    assert choose_runner("onnxruntime", "cuda") == "onnxruntime"
    assert choose_runner("torch", "cpu") == "torch"


@pytest.mark.parametrize("outside_rows", [0, 8])
def test_heads_with_and_without_the_outside_estimate_load_and_exact_mode_stays_exact(tmp_path, outside_rows):
    """Heads saved before they estimated the outside mass (no `outside` rows) still load and serve."""
    from prometheus_client import CollectorRegistry

    from exitserve.service.serving.generation.model import load_generation_model

    path = write_tiny_generation_bundle(tmp_path / "tiny-llm", outside_rows=outside_rows)
    gm = load_generation_model(path, CollectorRegistry())
    heads = gm.decoder.heads
    assert heads is not None and heads.outside_rows == outside_rows
    assert heads.output_columns == heads.vocab_size + (1 if outside_rows else 0)
    outputs = {}
    for mode in ("full", "exact"):
        seq = gm.decoder.new_sequence([3, 4, 5], capacity=40, mode=mode, delta=0.5, policy="pcee")
        while len(seq.tokens) < 3 + 24:
            gm.decoder.step([seq])
        outputs[mode] = seq.tokens[3:3 + 24]
    assert outputs["exact"] == outputs["full"]
