"""engine.infer called directly (the CLI tests cover `eval` and `predict` end to end): evaluate, its outputs, CSVs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSES, write_dataset, write_image

from pathotune import Task, create_model, save_bundle
from pathotune.data import load_rgb
from pathotune.engine.infer import eval_transform, evaluate, predict_to_csv, write_evaluation
from pathotune.engine.metrics import METRIC_NAMES, classification_metrics
from pathotune.errors import DataError, OutputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("infer") / "tiles", {"train": 1, "val": 2, "test": 3})


@pytest.fixture
def model(tiny_kwargs: dict):
    torch.manual_seed(0)
    net = create_model("vit_small_patch16_224", "linear", 3, task=Task(classes=CLASSES), **tiny_kwargs)
    with torch.no_grad():  # a head that tells the colours apart a little, so the metrics are not all ties
        net.head.weight.normal_(0, 1.0)
    return net.eval()


@pytest.fixture
def run(model, tmp_path: Path) -> Path:
    """A run folder as `pathotune train` leaves it: the bundle in bundle/, a finished metrics.json beside it."""
    root = tmp_path / "run"
    save_bundle(model, root / "bundle")
    (root / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    return root


def reference(model, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels (by class name, into the model's classes) and probabilities, one image at a time."""
    files = sorted(folder.rglob("*.png"))
    tf = eval_transform(model)
    with torch.no_grad():
        probs = torch.cat([model(tf(load_rgb(f))[None]).softmax(-1) for f in files]).numpy()
    return np.array([model.class_names.index(f.parent.name) for f in files]), probs


def test_evaluate_matches_a_forward_per_image(model, run, data: Path) -> None:
    m = evaluate(run, data, bootstrap=50, progress=False)
    labels, probs = reference(model, data / "test")
    expected = classification_metrics(labels, probs, model.class_names)
    assert m["split"] == "test" and m["n"] == 9 and m["evaluation"] is True
    assert m["bundle"] == str(run) and m["data"] == str(data)
    for key in METRIC_NAMES:
        assert m[key] == pytest.approx(expected[key], abs=1e-6), key
    assert m["confusion_matrix"] == expected["confusion_matrix"]
    assert set(m["ci"]) == set(METRIC_NAMES)
    assert "ci" not in evaluate(run / "bundle", data, split="val", bootstrap=0, progress=False)


def test_evaluate_matches_classes_by_name(model, run, data: Path, tmp_path: Path) -> None:
    """A data set with fewer classes (so other indices) is scored against the bundle's own class order."""
    subset = tmp_path / "two"
    for cls in ("red", "blue"):
        shutil.copytree(data / "test" / cls, subset / cls)
    m = evaluate(run, subset, bootstrap=0, progress=False)
    labels, probs = reference(model, subset)
    assert m["split"] == "all" and m["n"] == 6  # no split folders: every sample
    assert m["accuracy"] == pytest.approx(classification_metrics(labels, probs, model.class_names)["accuracy"])
    write_image(subset / "purple" / "p.png", (150, 40, 150), np.random.default_rng(0))
    with pytest.raises(DataError, match=r"classes \['purple'\] that bundle"):
        evaluate(run, subset, bootstrap=0, progress=False)
    shutil.rmtree(subset / "purple")
    with pytest.raises(DataError, match="no 'test' samples"):
        evaluate(run, subset, split="test", bootstrap=0, progress=False)


def test_write_evaluation_never_replaces_a_run(run, data: Path, tmp_path: Path) -> None:
    m = evaluate(run, data, bootstrap=0, progress=False)
    assert write_evaluation(tmp_path / "ev", m) == tmp_path / "ev"
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 9
    assert (tmp_path / "ev" / "report.md").is_file()
    target = write_evaluation(run, m)  # a run folder: beside its outputs, never over them
    assert target == run / "eval" / "tiles-test" and json.loads((run / "metrics.json").read_text()) == {"accuracy": 0.5}
    other = dict(m, split="val")
    (run / "eval" / "tiles-test" / "metrics.json").write_text(json.dumps(other))
    with pytest.raises(OutputError, match="already holds other results"):
        write_evaluation(run, m)


def test_predict_to_csv(model, run, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    files, results = predict_to_csv(
        [run], [data / "test" / "red", data / "test" / "blue" / "test_blue_0.png"], out, progress=False
    )
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]) for r in rows] == files and len(files) == 4
    assert list(rows[0]) == ["path", "pred", *[f"prob_{c}" for c in CLASSES]]
    ((classes, probs),) = results.values()
    _, ref = reference(model, data / "test" / "red")
    np.testing.assert_allclose(probs[:3], ref, atol=1e-5)
    assert [r["pred"] for r in rows] == [classes[int(p.argmax())] for p in probs]
    with pytest.raises(OutputError, match="is a folder"):
        predict_to_csv([run], [data / "test"], tmp_path, progress=False)
