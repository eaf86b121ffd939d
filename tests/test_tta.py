"""Test-time augmentation: the same 8 exact views for every method, through cached features or the forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, read_predictions, run_main, write_config, write_dataset

from pathotune.engine.config import TrainConfig
from pathotune.engine.run import train_run
from pathotune.engine.tta import VIEWS, TTAModel, averaged, views


def test_views_are_the_eight_exact_symmetries() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    vs = views(x)
    assert len(vs) == VIEWS and torch.equal(vs[0], x)
    assert len({v.numpy().tobytes() for v in vs}) == 8  # all distinct
    assert all(sorted(v.flatten().tolist()) == sorted(x.flatten().tolist()) for v in vs)  # no interpolation
    invariant = averaged(lambda t: t.sum(dim=(-1, -2)).softmax(-1))
    assert torch.allclose(invariant(x), x.sum(dim=(-1, -2)).softmax(-1))


def test_tta_model_outputs_the_log_of_the_averaged_probabilities() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(3, 3, 4, 4)
    expected = torch.stack([net(v).softmax(-1) for v in views(x)]).mean(0)
    torch.testing.assert_close(TTAModel(net)(x).softmax(-1), expected)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tta") / "d", {"train": 5, "val": 3, "test": 3})


def test_cached_probe_and_image_model_average_the_same_views(data, tmp_path) -> None:
    """The probe's TTA goes through the features of each view; the same bundle run image by image through
    TTAModel gives the same probabilities, so every method really gets the same views."""
    from pathotune import load_bundle, transforms
    from pathotune.data import PatchDataset, load_source

    base = {**TINY_CONFIG, "accelerator": "cpu", "augment": "none", "bootstrap": 0, "data": str(data)}
    m = train_run(TrainConfig(**base, method="linear", tta=True, out=str(tmp_path / "lin")), progress=False)
    assert set(m["tta"]) >= {"balanced_accuracy", "macro_f1", "auroc", "val_score"}
    rows = read_predictions(tmp_path / "lin" / "predictions_tta.csv")
    got = np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])
    model = load_bundle(tmp_path / "lin" / "bundle")
    ds = PatchDataset(load_source(data).split("test"), transforms(model))
    with torch.no_grad():
        ref = TTAModel(model)(torch.stack([ds[i][0] for i in range(len(ds))])).softmax(-1).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5)
    single = read_predictions(tmp_path / "lin" / "predictions.csv")
    assert [r["path"] for r in single] == [r["path"] for r in rows]


def test_eval_and_predict_take_tta(data, tmp_path, monkeypatch, capsys) -> None:
    cfg = write_config(tmp_path / "c.yaml", bootstrap=0)
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", data, "--config", cfg, "--method", "linear",
                            "--out", tmp_path / "run", "--quiet", "--accelerator", "cpu", "--tta")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    code, out, err = run_main(monkeypatch, capsys, "eval", tmp_path / "run", "--data", data, "--tta", "--json",
                              "--accelerator", "cpu")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["tta"] is True and result["balanced_accuracy"] == pytest.approx(metrics["tta"]["balanced_accuracy"])
    code, _, err = run_main(monkeypatch, capsys, "predict", tmp_path / "run", data / "test", "--tta",
                            "--out", tmp_path / "p.csv", "--accelerator", "cpu")  # fmt: skip
    assert code == 0, err
    tta_rows = {r["path"]: r for r in read_predictions(tmp_path / "run" / "predictions_tta.csv")}
    for r in read_predictions(tmp_path / "p.csv"):
        assert r["pred"] == tta_rows[r["path"]]["pred"]
