"""Slide-level MIL: aggregators, feature/label readers, cross-validated training and fold-ensemble prediction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from pathotune.errors import ConfigError, DataError
from pathotune.mil import (
    FeatureBagDataset,
    MILConfig,
    check_feature_compatibility,
    create_aggregator,
    list_aggregators,
    load_mil_config,
    load_mil_model,
    plan_folds,
    predict_slides,
    read_slide_features,
    read_slide_labels,
    train_mil,
)

DIM = 16
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auroc")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_slide(path: Path, feats: np.ndarray, coords: np.ndarray | None = None, **attrs) -> Path:
    """A slide feature file in the layout the extraction step writes."""
    n = feats.shape[0]
    if coords is None:
        coords = np.stack([np.arange(n) * 224, np.zeros(n)], axis=1)
    base = {
        "backbone": "toy_vit",
        "bundle_fingerprint": "",
        "feature_dim": feats.shape[1],
        "mpp": 0.25,
        "target_mpp": 0.5,
        "tile_size": 224,
        "level": 0,
        "slide_path": f"/slides/{path.stem}.svs",
        "n_tiles": n,
    }
    base.update(attrs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["coords"] = np.asarray(coords, dtype=np.int64)
        f["features"] = np.asarray(feats, dtype=np.float32)
        for k, v in base.items():
            f.attrs[k] = v
    return path


def write_labels(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_cohort(root: Path, n: int = 24, seed: int = 0) -> tuple[Path, Path, dict[str, set[int]]]:
    """Negatives: N(0, I) tiles. Positives: the same plus 3-5 tiles from a shifted distribution (the signal)."""
    rng = np.random.default_rng(seed)
    feats_dir = root / "features"
    planted: dict[str, set[int]] = {}
    rows = []
    for i in range(n):
        slide_id, label = f"slide_{i:02d}", ("tumor" if i % 2 else "normal")
        tiles = int(rng.integers(20, 41))
        x = rng.normal(size=(tiles, DIM))
        idx = np.array([], dtype=np.int64)
        if label == "tumor":
            idx = rng.choice(tiles, size=int(rng.integers(3, 6)), replace=False)
            x[idx] = 1.5 + 0.5 * rng.normal(size=(idx.size, DIM))
        write_slide(feats_dir / f"{slide_id}.h5", x)
        planted[slide_id] = set(idx.tolist())
        rows.append({"slide_id": slide_id, "label": label})
    return feats_dir, write_labels(root / "labels.csv", rows), planted


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path, dict[str, set[int]]]:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


def quick_config(feats: Path, labels: Path, out: Path, **kw) -> MILConfig:
    base = {"folds": 3, "epochs": 15, "lr": 1e-3, "hidden": 32, "patience": 15, "bootstrap": 100}
    return MILConfig(features=str(feats), labels=str(labels), out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def abmil_run(cohort, tmp_path_factory) -> tuple[dict, Path]:
    feats, labels, _ = cohort
    out = tmp_path_factory.mktemp("runs") / "abmil"
    return train_mil(quick_config(feats, labels, out), progress=False), out


# ----------------------------------------------------------------------------------------------- aggregators


@pytest.mark.parametrize("name", list_aggregators())
@pytest.mark.parametrize("n_tiles", [1, 2, 5, 17])
def test_aggregator_shapes_and_scores(name: str, n_tiles: int) -> None:
    torch.manual_seed(0)
    model = create_aggregator(name, DIM, 3).eval()
    logits, scores = model(torch.randn(1, n_tiles, DIM))
    assert logits.shape == (1, 3) and scores.shape == (1, n_tiles)
    assert torch.all(scores >= 0)
    assert scores.sum().item() == pytest.approx(1.0, abs=1e-5)
    unbatched_logits, _ = model(torch.randn(n_tiles, DIM))
    assert unbatched_logits.shape == (1, 3)


@pytest.mark.parametrize("name", list_aggregators())
def test_mask_matches_unpadded_bags(name: str) -> None:
    torch.manual_seed(0)
    model = create_aggregator(name, DIM, 2).eval()
    x = torch.randn(2, 9, DIM)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    logits, scores = model(x, mask)
    alone_logits, alone_scores = model(x[1:, :6])
    torch.testing.assert_close(logits[1:], alone_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[1:, :6], alone_scores, atol=1e-6, rtol=0)
    assert torch.all(scores[1, 6:] == 0)
    torch.testing.assert_close(scores.sum(1), torch.ones(2), atol=1e-5, rtol=0)


def test_abmil_attention_is_a_softmax_over_tiles() -> None:
    torch.manual_seed(0)
    model = create_aggregator("abmil", DIM, 2, hidden=32, attn_dim=16).eval()
    _, attn = model(torch.randn(3, 11, DIM))
    torch.testing.assert_close(attn.sum(1), torch.ones(3), atol=1e-6, rtol=0)
    assert torch.all(attn > 0)


@pytest.mark.parametrize("name", ["mean", "abmil"])
def test_permutation_invariance(name: str) -> None:
    torch.manual_seed(0)
    model = create_aggregator(name, DIM, 3).eval()
    x = torch.randn(1, 23, DIM)
    perm = torch.randperm(23)
    logits, scores = model(x)
    logits_p, scores_p = model(x[:, perm])
    assert (logits - logits_p).abs().max().item() < 1e-6
    assert (scores[:, perm] - scores_p).abs().max().item() < 1e-6


def test_create_aggregator_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown MIL aggregator 'clam'.*abmil"):
        create_aggregator("clam", DIM, 2)
    with pytest.raises(ConfigError, match=r"'mean' does not take \['hidden'\]"):
        create_aggregator("mean", DIM, 2, hidden=64)
    with pytest.raises(ConfigError, match="divisible by heads"):
        create_aggregator("transmil", DIM, 2, hidden=30, heads=8)


# --------------------------------------------------------------------------------------- features and labels


def test_read_slide_features_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(7, DIM))
    path = write_slide(tmp_path / "s1.h5", x, bundle_fingerprint="abc123")
    feats, coords, attrs = read_slide_features(path)
    assert feats.dtype == torch.float32 and feats.shape == (7, DIM)
    assert coords.dtype == np.int64 and coords.shape == (7, 2)
    assert attrs["backbone"] == "toy_vit" and attrs["bundle_fingerprint"] == "abc123"
    assert attrs["feature_dim"] == DIM and attrs["n_tiles"] == 7 and isinstance(attrs["tile_size"], int)


def test_read_slide_features_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_slide_features(tmp_path / "absent.h5")
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"this is not hdf5")
    with pytest.raises(DataError, match=r"broken\.h5 is not a readable HDF5 file"):
        read_slide_features(broken)
    no_coords = tmp_path / "no_coords.h5"
    with h5py.File(no_coords, "w") as f:
        f["features"] = np.zeros((3, DIM), dtype=np.float32)
    with pytest.raises(DataError, match=r"no_coords\.h5 has no dataset 'coords'"):
        read_slide_features(no_coords)
    lying = write_slide(tmp_path / "lying.h5", np.zeros((3, DIM)), feature_dim=DIM + 1)
    with pytest.raises(DataError, match=r"lying\.h5: attribute feature_dim=17"):
        read_slide_features(lying)


def test_shared_attrs_weight_fingerprints_and_empty_slides(tmp_path: Path) -> None:
    x = np.zeros((4, DIM))
    a = write_slide(tmp_path / "a.h5", x, backbone_fingerprint="w1", target_mpp=np.nan)
    b = write_slide(tmp_path / "b.h5", x, backbone_fingerprint="w1", target_mpp=np.nan, mpp=0.5)
    shared = check_feature_compatibility([a, b])
    assert shared["backbone_fingerprint"] == "w1" and shared["target_mpp"] is None and shared["tile_size"] == 224
    assert not {"mpp", "slide_path", "n_tiles"} & set(shared)
    c = write_slide(tmp_path / "c.h5", x, backbone_fingerprint="w2")
    with pytest.raises(DataError, match=r"a\.h5 and .*c\.h5 .*\(backbone_fingerprint 'w1' vs 'w2'\)"):
        check_feature_compatibility([a, c])
    empty = write_slide(tmp_path / "empty.h5", np.zeros((0, DIM)))
    with pytest.raises(DataError, match=r"empty\.h5 has no tiles"):
        read_slide_features(empty)


def test_labels_missing_column(tmp_path: Path, cohort) -> None:
    csv_path = write_labels(tmp_path / "l.csv", [{"slide_id": "slide_00", "diagnosis": "tumor"}])
    with pytest.raises(DataError, match=r"l\.csv has no column 'label'; expected slide_id,label"):
        read_slide_labels(csv_path)


def test_labels_unknown_slide_ids_listed_with_count(tmp_path: Path, cohort) -> None:
    feats, _, _ = cohort
    rows = [{"slide_id": f"slide_{i:02d}", "label": "a" if i % 2 else "b"} for i in range(4)]
    rows += [{"slide_id": f"ghost_{i}", "label": "a"} for i in range(7)]
    with pytest.raises(DataError, match=r"7 slide id\(s\) have no feature file") as err:
        read_slide_labels(write_labels(tmp_path / "l.csv", rows), feats)
    message = str(err.value)
    assert "ghost_0, ghost_1, ghost_2, ghost_3, ghost_4, ..." in message and "ghost_5" not in message


def test_labels_other_errors_and_sorted_classes(tmp_path: Path) -> None:
    both = write_labels(tmp_path / "both.csv", [{"slide_id": "a", "label": "x", "split": "train", "fold": 0}])
    with pytest.raises(DataError, match="both 'split' and 'fold'"):
        read_slide_labels(both)
    bad_split = write_labels(tmp_path / "bad.csv", [{"slide_id": "a", "label": "x", "split": "holdout"}])
    with pytest.raises(DataError, match="line 2: split 'holdout'"):
        read_slide_labels(bad_split)
    one_class = write_labels(tmp_path / "one.csv", [{"slide_id": "a", "label": "x"}, {"slide_id": "b", "label": "x"}])
    with pytest.raises(DataError, match="single class"):
        read_slide_labels(one_class)
    graded = [{"slide_id": f"s{i}", "label": g} for i, g in enumerate(["10", "2", "1", "2"])]
    table = read_slide_labels(write_labels(tmp_path / "g.csv", graded))
    assert table.classes == ["1", "2", "10"] and table.mode == "kfold"
    assert table.targets.tolist() == [2, 1, 0, 1]


def test_mixed_backbones_refused_naming_both_files(tmp_path: Path) -> None:
    x = np.zeros((4, DIM))
    write_slide(tmp_path / "f" / "a.h5", x)
    write_slide(tmp_path / "f" / "b.h5", x, backbone="uni")
    with pytest.raises(DataError, match=r"a\.h5 and .*b\.h5 come from different extractors \(backbone"):
        FeatureBagDataset(tmp_path / "f", ["a", "b"], [0, 1])
    labels = write_labels(tmp_path / "l.csv", [{"slide_id": "a", "label": "x"}, {"slide_id": "b", "label": "y"}])
    with pytest.raises(DataError, match="different extractors"):
        train_mil(MILConfig(features=str(tmp_path / "f"), labels=str(labels), out=str(tmp_path / "o")), progress=False)
    assert not (tmp_path / "o").exists()


def test_plan_folds_modes(tmp_path: Path, cohort) -> None:
    _, labels, _ = cohort
    table = read_slide_labels(labels)
    plans = plan_folds(table, folds=3, val_fraction=0.2, seed=0)
    tests = np.concatenate([p.test for p in plans])
    assert sorted(tests.tolist()) == list(range(24))
    for p in plans:
        assert not set(p.val) & set(p.test) and not set(p.train) & set(p.test) and not set(p.train) & set(p.val)
        assert np.bincount(table.targets[p.test]).tolist() == [4, 4]
        assert np.bincount(table.targets[p.val]).tolist() == [2, 2]
    again = plan_folds(table, folds=3, val_fraction=0.2, seed=0)
    for a, b in zip(plans, again, strict=True):
        assert np.array_equal(a.val, b.val) and np.array_equal(a.test, b.test)
    rows = [{"slide_id": r.slide_id, "label": r.label, "fold": i % 2 + 1} for i, r in enumerate(table)]
    given = plan_folds(read_slide_labels(write_labels(tmp_path / "f.csv", rows)), 5, 0.2, 0)
    assert [p.name for p in given] == ["fold_1", "fold_2"]
    assert given[0].test.tolist() == list(range(0, 24, 2))
    with pytest.raises(ConfigError, match="fewer slides than folds"):
        plan_folds(table, folds=13, val_fraction=0.2, seed=0)


def test_config_errors(cohort) -> None:
    feats, labels, _ = cohort
    with pytest.raises(ConfigError, match="unknown key 'fold'"):
        load_mil_config(None, features=str(feats), labels=str(labels), fold=3)
    with pytest.raises(ConfigError, match="key 'folds'"):
        load_mil_config(None, features=str(feats), labels=str(labels), folds=1)
    with pytest.raises(ConfigError, match="'mean' has no 'hidden' option"):
        MILConfig(features=str(feats), labels=str(labels), aggregator="mean", hidden=64).model_kwargs()


# ------------------------------------------------------------------------------------------ training and prediction


def test_abmil_learns_planted_signal_and_attends_to_it(abmil_run, cohort) -> None:
    metrics, out = abmil_run
    feats, _, planted = cohort
    assert metrics["auroc"]["mean"] > 0.9
    assert metrics["pooled"]["auroc"] > 0.9
    hits = []
    for fold in ("fold_0", "fold_1", "fold_2"):
        meta = json.loads((out / fold / "model.json").read_text())
        test_files = [feats / f"{s}.h5" for s in meta["slides"]["test"]]
        for result in predict_slides(out / fold, test_files):
            if planted[result["slide_id"]]:
                top5 = set(np.argsort(-result["tile_scores"])[:5].tolist())
                hits.append(len(top5 & planted[result["slide_id"]]) / min(5, len(planted[result["slide_id"]])))
    assert len(hits) == 12
    assert np.mean(hits) > 0.8


def test_run_outputs_and_fold_summary(abmil_run, cohort) -> None:
    metrics, out = abmil_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["n_folds"] == 3 and on_disk["mode"] == "kfold" and on_disk["classes"] == ["normal", "tumor"]
    for key in METRICS:
        values = np.array([fold[key] for fold in on_disk["per_fold"]], dtype=np.float64)
        assert on_disk[key]["mean"] == pytest.approx(values.mean())
        assert on_disk[key]["std"] == pytest.approx(values.std(ddof=1))
    for fold in ("fold_0", "fold_1", "fold_2"):
        for name in ("model.safetensors", "model.json", "log.csv", "training_curves.png"):
            assert (out / fold / name).is_file()
        assert not (out / fold / "last.pt").exists()
    for name in ("report.md", "confusion_matrix.png", "config.yaml", "oof_predictions.csv"):
        assert (out / name).is_file()
    assert "mean ± std" in (out / "report.md").read_text()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert MILConfig(**saved).aggregator == "abmil"
    with open(out / "oof_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["slide_id", "label", "fold", "prob_normal", "prob_tumor"]
    assert len(rows) == 24 and len({r["slide_id"] for r in rows}) == 24
    assert all(abs(float(r["prob_normal"]) + float(r["prob_tumor"]) - 1) < 1e-5 for r in rows)


def test_reproducible_with_seed(abmil_run, cohort, tmp_path: Path) -> None:
    metrics, out = abmil_run
    feats, labels, _ = cohort
    again = train_mil(quick_config(feats, labels, tmp_path / "again"), progress=False)
    for first, second in zip(metrics["per_fold"], again["per_fold"], strict=True):
        assert {k: first[k] for k in (*METRICS, "best_epoch")} == {k: second[k] for k in (*METRICS, "best_epoch")}
    assert (out / "oof_predictions.csv").read_text() == (tmp_path / "again" / "oof_predictions.csv").read_text()


def test_predict_slides_ensemble_and_single_fold(abmil_run, cohort) -> None:
    _, out = abmil_run
    feats, _, _ = cohort
    results = predict_slides(out, feats)
    assert [r["slide_id"] for r in results] == [f"slide_{i:02d}" for i in range(24)]
    for r in results:
        assert r["probs"].shape == (2,) and r["probs"].sum() == pytest.approx(1.0, abs=1e-5)
        assert r["pred"] == r["classes"][int(r["probs"].argmax())]
        assert r["tile_scores"].shape == (r["coords"].shape[0],)
        assert r["tile_scores"].sum() == pytest.approx(1.0, abs=1e-5)
    single = predict_slides(out / "fold_1", [feats / "slide_03.h5"])[0]
    model, meta = load_mil_model(out / "fold_1")
    x, _, _ = read_slide_features(feats / "slide_03.h5")
    with torch.no_grad():
        expected = model(x)[0].softmax(-1)[0].numpy()
    np.testing.assert_allclose(single["probs"], expected, atol=1e-6)
    assert meta["classes"] == ["normal", "tumor"] and meta["feature_attrs"]["backbone"] == "toy_vit"


def test_predict_refuses_other_backbone(abmil_run, tmp_path: Path) -> None:
    _, out = abmil_run
    other = write_slide(tmp_path / "x.h5", np.zeros((5, DIM)), backbone="uni")
    with pytest.raises(DataError, match=r"x\.h5 have backbone 'uni' but the model .* trained on 'toy_vit'"):
        predict_slides(out, [other])


def test_split_column_is_used(cohort, tmp_path: Path) -> None:
    feats, labels, _ = cohort
    table = read_slide_labels(labels)
    split_of = {i: "test" if i >= 18 else "val" if i >= 14 else "train" for i in range(24)}
    rows = [{"slide_id": r.slide_id, "label": r.label, "split": split_of[i]} for i, r in enumerate(table)]
    csv_path = write_labels(tmp_path / "split.csv", rows)
    cfg = quick_config(feats, csv_path, tmp_path / "run", aggregator="mean", hidden=None, epochs=3, bootstrap=0)
    metrics = train_mil(cfg, progress=False)
    assert metrics["mode"] == "split" and metrics["n_folds"] == 1
    assert metrics["per_fold"][0]["n_test"] == 6 and metrics["auroc"]["std"] == 0.0
    meta = json.loads((tmp_path / "run" / "fold_0" / "model.json").read_text())
    for part in ("train", "val", "test"):
        assert meta["slides"][part] == [r["slide_id"] for i, r in enumerate(rows) if split_of[i] == part]
    with open(tmp_path / "run" / "oof_predictions.csv", newline="") as handle:
        assert [r["slide_id"] for r in csv.DictReader(handle)] == meta["slides"]["test"]


def test_model_folder_written_by_0_1_0_still_predicts(tmp_path: Path) -> None:
    """``tests/data/legacy_0.1.0/mil_fold`` is a fold folder written by pathotune 0.1.0 (commit 1b28e50): ABMIL
    (hidden 8) on 16-d synthetic bags of extractor 'toy_vit'. Today's code loads it and scores a fixed bag as
    0.1.0 did (the reference numbers were printed by that version)."""
    fold = Path(__file__).parent / "data" / "legacy_0.1.0" / "mil_fold"
    model, meta = load_mil_model(fold)
    assert meta["format_version"] == 1 and meta["aggregator"] == "abmil" and meta["classes"] == ["normal", "tumor"]
    x = np.linspace(-1, 1, 5 * 16, dtype=np.float32).reshape(5, 16)
    probe = write_slide(tmp_path / "probe.h5", x, coords=np.stack([np.arange(5) * 32, np.zeros(5)], 1), tile_size=32)
    with h5py.File(probe, "a") as f:  # the attributes the legacy bags had, no more
        for k in ("mpp", "target_mpp", "level", "slide_path", "n_tiles"):
            del f.attrs[k]
    (pred,) = predict_slides(fold, [probe])
    np.testing.assert_allclose(pred["probs"], [0.46516165137290955, 0.5348382592201233], atol=1e-6)
    expected_scores = [
        0.20374415814876556,
        0.19993405044078827,
        0.19708389043807983,
        0.19851996004581451,
        0.2007180005311966,
    ]
    np.testing.assert_allclose(pred["tile_scores"], expected_scores, atol=1e-6)
    with pytest.raises(DataError, match="trained on 'toy_vit'"):
        predict_slides(fold, [write_slide(tmp_path / "uni.h5", x, backbone="uni")])
