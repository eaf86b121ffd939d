"""The run folder as a record, on the paths that succeed: --resume of a finished run is a no-op, --resume with
no checkpoint starts fresh, harmless settings may change on resume, seeds resume one by one, evaluation writes
beside a run and never over it, duplicates are dropped with a one-line warning, format-1 bundles still load."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from fault_kit import Base, base_train_args
from helpers import read_metrics, run_main

from pathotune.records import MARKER

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_resume_of_a_finished_run_is_a_no_op_that_says_so(base: Base, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(base.run, tmp_path / "run"))
    before = tree(run)
    code, out, err = run_main(monkeypatch, capsys, *base_train_args(base, run, "--resume"))
    assert code == 0, err
    assert f"{run} holds a finished run (metrics.json); nothing to resume" in out
    assert tree(run) == before


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(base: Base, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_main(monkeypatch, capsys, *base_train_args(base, out_dir, "--resume", "--method", "linear"))
    assert code == 0, err
    assert f"note: no checkpoint in {out_dir}; --resume starts a fresh run" in out
    assert read_metrics(out_dir)["method"] == "linear"


def test_resume_may_change_harmless_settings_and_records_them(base: Base, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(base.run, tmp_path / "run"))
    (run / "metrics.json").unlink()
    ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["config"]["method"] == "pathotune" and ck["recipe"]["lr"] == pytest.approx(3e-3)
    args = base_train_args(base, run, "--resume", "--num-workers", "1", "--lr", "0.003")  # lr as the default
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["num_workers"] == 1 and config["resume"] is True
    assert read_metrics(run)["steps_run"] == 2


def test_seeds_resume_one_by_one(base: Base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "seeds"
    args = base_train_args(base, out, "--method", "linear", "--seeds", "0", "1")
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    seed_0 = tree(out / "seed_0")
    (out / "metrics.json").unlink()  # as if killed while seed 1 was running
    shutil.rmtree(out / "seed_1")
    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and "unfinished run" in err
    code, stdout, err = run_main(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert f"{out / 'seed_0'} holds a finished run" in stdout
    assert tree(out / "seed_0") == seed_0
    assert read_metrics(out)["seeds"] == [0, 1] and read_metrics(out / "seed_1")["seed"] == 1


def test_eval_into_a_run_writes_beside_it(base: Base, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(base.run, tmp_path / "run"))
    before = tree(run)
    for _ in range(2):  # the second evaluation of the same data replaces its own results only
        code, out, err = run_main(monkeypatch, capsys, "eval", run, "--data", base.tiles, "--out", run)
        assert code == 0, err
        assert f"written to {run / 'eval' / 'tiles-test'}" in out
    after = tree(run)
    assert {k: v for k, v in after.items() if not k.startswith("eval/")} == before
    m = json.loads((run / "eval" / "tiles-test" / "metrics.json").read_text())
    assert m["evaluation"] is True and m["split"] == "test"
    assert (run / "eval" / "tiles-test" / "report.md").is_file()
    assert read_metrics(run)["method"] == "pathotune"  # the run's own metrics.json is still the training one


def test_eval_into_a_new_folder_writes_there(base: Base, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "eval", base.run, "--data", base.tiles, "--out", tmp_path / "ev")
    assert code == 0, err
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_duplicate_csv_rows_count_once_with_one_warning_line(base: Base, tmp_path, monkeypatch, capsys):
    rows = ["path,label,split"]
    for p in sorted(base.tiles.rglob("*.png")):
        split, cls = p.relative_to(base.tiles).parts[:2]
        rows += [f"{p},{cls},{split}"] * 2  # every row twice
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    args = base_train_args(base, tmp_path / "run", "--method", "linear")
    args[args.index("--data") + 1] = manifest
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert read_metrics(tmp_path / "run")["n_train"] == 12  # 4 per class, not 8
    warnings = [ln for ln in err.splitlines() if ln.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "dropped 24 repeated row(s)" in warnings[0]


def test_copies_within_a_split_count_once(base: Base, tmp_path, monkeypatch, capsys):
    tiles = Path(shutil.copytree(base.tiles, tmp_path / "tiles"))
    shutil.copyfile(tiles / "train" / "red" / "train_red_0.png", tiles / "train" / "red" / "copy.png")
    args = base_train_args(base, tmp_path / "run", "--method", "linear")
    args[args.index("--data") + 1] = tiles
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert read_metrics(tmp_path / "run")["n_train"] == 12
    assert "dropped 1 duplicate sample(s)" in err and "copy.png" in err


def test_a_zero_learning_rate_warns_on_one_line(base: Base, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, *base_train_args(base, tmp_path / "run", "--lr", "0"))
    assert code == 0, err
    (line,) = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert "lr is 0" in line and "only the head trains" in line


def test_format_1_bundles_still_load(tmp_path, tiny_kwargs, text_features, images):
    """A bundle written before the manifest checksum (format 1): its sha256 covers the tensors only, and its
    switches predate gated prompt attention, so it loads as joint attention."""
    from pathotune import create_model, load_bundle, save_bundle
    from pathotune.bundle import MANIFEST

    torch.manual_seed(0)
    model = create_model("vit_small_patch16_224", "vpt-deep", 2, prompt_attn="joint", **tiny_kwargs).eval()
    out = save_bundle(model, tmp_path / "b")
    m = json.loads((out / MANIFEST).read_text())
    for key in ("manifest_sha256", "normalization"):
        m.pop(key)
    m["switches"].pop("prompt_attn")
    m["format_version"] = 1
    (out / MANIFEST).write_text(json.dumps(m))
    loaded = load_bundle(out)
    assert loaded.switches.prompt_attn == "joint"
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_save_bundle_overwrite(tmp_path, tiny_kwargs):
    from pathotune import BundleError, create_model, save_bundle
    from pathotune.bundle import read_manifest

    a = create_model("vit_small_patch16_224", "linear", 2, **tiny_kwargs)
    b = create_model("vit_small_patch16_224", "vpt-shallow", 2, **tiny_kwargs)
    save_bundle(a, tmp_path / "b")
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        save_bundle(b, tmp_path / "b")
    assert read_manifest(tmp_path / "b")["method"] == "linear"
    save_bundle(b, tmp_path / "b", overwrite=True)
    assert read_manifest(tmp_path / "b")["method"] == "vpt-shallow"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_overwrite_replaces_a_set_of_seeds_whole(base: Base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "seeds"
    code, _, err = run_main(monkeypatch, capsys, *base_train_args(base, out, "--method", "linear", "--seeds", "0", "1"))
    assert code == 0, err
    args = base_train_args(base, out, "--method", "linear", "--seeds", "2", "3", "--overwrite")
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert read_metrics(out)["seeds"] == [2, 3]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("seed_")) == ["seed_2", "seed_3"]
    assert [p.name for p in out.rglob("*") if p.name.startswith(".")] == [MARKER]
