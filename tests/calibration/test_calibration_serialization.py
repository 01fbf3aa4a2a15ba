"""calibration.json: round trip, validation with clear messages, compact conditional storage."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from calibration_reference import make_logits

from exitserve.calibration import POLICIES, Calibration, decide_all, fit_calibration
from exitserve.calibration.io import dumps, load_calibration, save_calibration


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(2)
    logits, labels = make_logits(rng, 300, 4, 3, discrete=False)
    return logits, labels


@pytest.fixture(scope="module")
def doc(problem):
    logits, labels = problem
    return fit_calibration(logits, labels, data_fingerprint="digits-val:300:abc").to_dict()


def test_document_holds_every_field_the_design_names(doc):
    for key in ("schema_version", "confidence", "validation_size", "data_fingerprint", "alpha", "window",
                "delta_grid", "labels_known", "binning", "bins", "num_exits"):
        assert key in doc
    assert doc["validation_size"] == 300 and doc["data_fingerprint"] == "digits-val:300:abc"
    assert doc["delta_grid"][0] == 0.5 and doc["delta_grid"][-1] == 1.0 and len(doc["delta_grid"]) == 51
    for ex in doc["exits"]:
        for key in ("temperature", "edges", "counts", "correct", "accuracy", "smoothed_accuracy", "lower_bound",
                    "per_exit_threshold", "conditional"):
            assert key in ex
        assert sum(ex["counts"]) == 300
        assert set(ex["conditional"]) == {"pcee-cond", "pcee-ws-cond", "pcee-lb-cond"}
    # exit 0's conditional tables are the same for every δ: stored once
    assert doc["exits"][0]["conditional"]["pcee-cond"]["grid_rows"] == [0] * 51
    assert doc["exits"][0]["conditional"]["pcee-cond"]["counts"] == [doc["exits"][0]["counts"]]


def test_round_trip_through_json_is_exact(problem, doc):
    logits, _ = problem
    text = dumps(doc)
    back = Calibration.from_dict(json.loads(text), num_exits=3)
    assert back.to_dict() == doc
    original = Calibration.from_dict(doc)
    deltas = np.random.default_rng(0).uniform(0.4, 1.0, 300)
    for policy in POLICIES:
        a, b = decide_all(original, policy, logits, deltas), decide_all(back, policy, logits, deltas)
        for field in ("exit_index", "prediction", "estimate", "target_met", "confidence"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_dumps_keeps_number_lists_on_one_line(doc):
    text = dumps(doc)
    assert json.loads(text) == doc
    # every number list on its own line (the 11 policies' tail tables make ~500 lines here)
    assert '"counts": [' in text and text.count("\n") < 700


def test_save_and_load(tmp_path, doc):
    path = save_calibration(Calibration.from_dict(doc), tmp_path / "calibration.json")
    assert load_calibration(path, num_exits=3).to_dict() == doc
    assert not list(tmp_path.glob(".*"))  # the temp file was renamed away
    with pytest.raises(ValueError, match="calibration.json: calibration: 3 exit tables for a model with 4 exits"):
        load_calibration(path, num_exits=4)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(tmp_path / "bad.json")


def test_wrong_exit_count_is_refused_with_a_clear_message(doc):
    with pytest.raises(ValueError, match=r"3 exit tables for a model with 2 exits \(was it calibrated for another bundle\?\)"):
        Calibration.from_dict(doc, num_exits=2)
    broken = copy.deepcopy(doc)
    broken["num_exits"] = 4
    with pytest.raises(ValueError, match="num_exits is 4 but 3 exit tables are given"):
        Calibration.from_dict(broken)


def _edit(doc, path, value):
    broken = copy.deepcopy(doc)
    target = broken
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return broken


@pytest.mark.parametrize(("path", "value", "message"), [
    (("schema_version",), 4, "schema_version 4 is not supported"),
    (("confidence",), "energy", "confidence: Input should be 'max-softmax', 'entropy' or 'margin'"),
    (("alpha",), 1.5, "alpha: Input should be less than 1"),
    (("delta_grid",), [0.9, 0.5], "delta_grid: delta_grid must be strictly increasing"),
    (("exits", 1, "temperature"), -1.0, "exit 1: temperature must be a positive number"),
    (("exits", 0, "edges"), [0.0, 0.6, 0.5, 1.0], "exit 0: edges: bin edges must be strictly increasing"),
    (("exits", 0, "edges"), [0.1, 1.0], "exit 0: edges: bin edges must start at 0 and end at 1"),
    (("exits", 0, "counts"), [1, 2], r"exit 0: counts: shape \(2,\), expected \(15,\)"),
    (("exits", 2, "accuracy"), [0.5] * 15, "exit 2: accuracy: does not match the counts"),
    (("exits", 0, "index"), 5, "exit 0: index is 5, expected 0"),
    (("exits", 0, "conditional", "pcee-lb-cond"), KeyError, "exits.0.conditional.pcee-lb-cond: Field required"),
    (("exits", 2, "tail", "confidence"), KeyError, "exits.2.tail.confidence: Field required"),
    (("exits", 0, "tail", "edges"), [0.0, 1.0], r"exit 0: tail pcee: counts and correct must be lists of rows of 1 bins"),
    (("exits", 0, "surprise"), 1, "exits.0.surprise: Extra inputs are not permitted"),
    (("bonus",), True, "bonus: Extra inputs are not permitted"),
    (("prior",), [1.0], "prior: List should have at least 2 items"),
    (("exits", 1, "conditional", "pcee-cond", "grid_rows"), [0] * 3, r"grid_rows: shape \(3,\), expected \(51,\)"),
    (("exits", 1, "temperature"), "1.0", "exits.1.temperature: Input should be a valid number"),
    (("labels_known",), 1, "labels_known: Input should be a valid boolean"),
    (("exits",), KeyError, "exits: Field required"),
])
def test_malformed_documents_are_refused_naming_the_field(doc, path, value, message):
    with pytest.raises(ValueError, match=message):
        Calibration.from_dict(_edit(doc, path, value))


def test_more_correct_than_samples_is_refused(doc):
    broken = copy.deepcopy(doc)
    ex = broken["exits"][1]
    b = int(np.argmax(ex["counts"]))
    ex["correct"][b] = ex["counts"][b] + 1
    with pytest.raises(ValueError, match="exit 1: a bin has more correct samples than samples"):
        Calibration.from_dict(broken)
    with pytest.raises(ValueError, match="expected a JSON object"):
        Calibration.from_dict([doc])


def test_fit_rejects_bad_inputs(problem):
    logits, labels = problem
    with pytest.raises(ValueError, match="exit 1: logits of shape"):
        fit_calibration([logits[0], logits[1][:10]], labels)
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_calibration(logits, labels + 10)
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_calibration([np.full((3, 2), np.nan, dtype=np.float32)], None)
    with pytest.raises(ValueError, match="unknown confidence measure"):
        fit_calibration(logits, labels, confidence="energy")
    with pytest.raises(ValueError, match="delta_grid values must lie in"):
        fit_calibration(logits, labels, delta_grid=[0.5, 1.2])
