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

from pathotune import Task, create_model, save_bundle, transforms
from pathotune.core.metrics import METRIC_NAMES, classification_metrics
from pathotune.core.runtime import Runtime, infer_dataset
from pathotune.data import load_rgb
from pathotune.engine.infer import evaluate, predict_to_csv, write_evaluation
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
    tf = transforms(model)
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


class Rows(torch.utils.data.Dataset):
    """Items ``(x, label, index)`` whose input is the index itself, so outputs show where each row went."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), 0, i


def test_infer_dataset_shards_and_gathers_in_order() -> None:
    """Two ranks read interleaved shares (the sampler pads 5 to 6); the gather puts every row back in its place."""
    double = lambda x: 2 * x  # noqa: E731
    alone = infer_dataset(Runtime.of(), Rows(), double, batch_size=2)
    assert alone.flatten().tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    shares: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def rank(r: int) -> Runtime:
        def gather(t: torch.Tensor) -> torch.Tensor:
            shares[r].append(t)
            other = 1 - r
            if not shares[other]:  # rank 1 runs first here: its own share stands in for both (shapes match)
                return torch.stack([t, t])
            theirs = shares[other][len(shares[r]) - 1]
            return torch.stack([t, theirs] if r == 0 else [theirs, t])

        return Runtime(torch.device("cpu"), rank=r, world_size=2, all_gather=gather)

    infer_dataset(rank(1), Rows(), double, batch_size=2)
    both = infer_dataset(rank(0), Rows(), double, batch_size=2)
    assert both.flatten().tolist() == alone.flatten().tolist()
    assert [len(s) for s in shares.values()] == [2, 2]  # outputs and indices, once each per rank
