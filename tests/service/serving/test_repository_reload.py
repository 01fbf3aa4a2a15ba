"""ModelRepository.reload in process: refusals, the hand-off between retired and new models, metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from reliability_support import MODEL, metric

from exitserve.errors import BadBundle
from exitserve.service.monitoring.metrics import Metrics
from exitserve.service.serving.batcher import ShuttingDown, WorkItem
from exitserve.service.serving.repository import ModelRepository, ReloadRefused
from exitserve.service.settings import Settings


@pytest.fixture
def repository(digits_bundle: Path, tmp_path: Path):
    bundle = tmp_path / "digits"
    shutil.copytree(digits_bundle, bundle)
    repo = ModelRepository(Settings(bundles=[bundle], max_batch_size=4, drain_timeout_s=2), Metrics())
    repo.load([bundle])
    yield repo
    repo.stop(2)


def _item(loop: asyncio.AbstractEventLoop) -> WorkItem:
    return WorkItem(x=np.zeros((1, 1, 8, 8), np.float32), deltas=np.array([0.9]), policies=np.array(["pcee"], object),
                    want_probabilities=None, loop=loop, future=loop.create_future())


def test_reload_before_warm_up_is_refused(repository: ModelRepository) -> None:
    with pytest.raises(ReloadRefused, match="still warming up"):
        repository.reload(MODEL)


def test_retired_model_hands_requests_to_a_compatible_successor(repository: ModelRepository) -> None:
    repository.start()
    old = repository.get(MODEL)
    new = repository.reload(MODEL)
    assert repository.get(MODEL) is new and old.successor is new and new.ready

    async def through_old() -> int:
        item = _item(asyncio.get_running_loop())
        old.submit(item)  # the old batcher is closed: the item must reach the new one
        return int((await asyncio.wait_for(item.future, 10)).exit_index[0])

    assert asyncio.run(through_old()) in (0, 1, 2)
    text = generate_latest(repository.metrics.registry).decode()
    assert metric(text, "exitserve_model_reloads_total", model=MODEL, outcome="ok") == 1
    assert metric(text, "exitserve_model_ready", model=MODEL) == 1


def test_successor_with_other_labels_does_not_take_old_requests(repository: ModelRepository, tmp_path: Path) -> None:
    repository.start()
    relabelled = tmp_path / "relabelled"
    shutil.copytree(repository.paths[MODEL], relabelled)
    manifest = json.loads((relabelled / "manifest.json").read_text())
    manifest["labels"] = [f"class-{label}" for label in manifest["labels"]]  # same count, other names
    (relabelled / "manifest.json").write_text(json.dumps(manifest))
    old = repository.get(MODEL)
    repository.reload(MODEL, relabelled)

    async def through_old() -> None:
        old.submit(_item(asyncio.get_running_loop()))

    with pytest.raises(ShuttingDown, match="reloaded with other inputs or labels"):
        asyncio.run(through_old())


def test_reload_all_reports_failures_and_keeps_serving(repository: ModelRepository) -> None:
    repository.start()
    before = repository.get(MODEL)
    (repository.paths[MODEL] / "calibration.json").write_text("{}")
    outcome = repository.reload_all()
    assert "calibration.json: sha256 mismatch" in outcome[MODEL]
    assert repository.get(MODEL) is before and before.ready
    with pytest.raises(BadBundle):
        repository.reload(MODEL)
