"""The fault corpus: bad inputs and broken environments, each of which must end in one line and exit code 2,
with no traceback and every file that existed before byte-identical afterwards.

Each case is a row: a name, a setup that writes the files it needs into the case's own folder (copies of one
shared tiny run and dataset, see conftest.py) and returns the command, the words the error line must hold,
and optionally a tmpfs mount, a monkeypatch, or a check of what the failure may leave. Commands run in-process
through the real entry point (``run_main``) unless a case needs a real process (warnings, progress bars).
API cases call the library and expect a :class:`~pathotune.errors.PathoTuneError` on one line.

Run one case alone: ``pytest tests/faults -k <name>``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_kit import Base, base_train_args, sha_tree, tmpfs
from helpers import TINY2, cli_cmd, cli_env, one_line_error, run_main, write_image

from pathotune.errors import PathoTuneError
from pathotune.records import MARKER

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Ctx:
    """A case's folder and the shared base it may copy from."""

    root: Path
    base: Base

    def run(self, name: str = "run") -> Path:
        """A copy of the finished shared run."""
        return Path(shutil.copytree(self.base.run, self.root / name))

    def unfinished(self, name: str = "run") -> Path:
        """A copy of the shared run as if killed after its last checkpoint: no metrics.json."""
        run = self.run(name)
        (run / "metrics.json").unlink()
        return run

    def tiles(self, name: str = "tiles") -> Path:
        return Path(shutil.copytree(self.base.tiles, self.root / name))

    def train(self, out: Path | str, *extra) -> list:
        return base_train_args(self.base, out, *extra)

    def manifest(self, run: Path) -> tuple[Path, dict]:
        path = run / "bundle" / "manifest.json"
        return path, json.loads(path.read_text())


@dataclass
class Case:
    name: str
    setup: Callable[[Ctx], list]  # returns the CLI arguments (or, for kind "api", a callable)
    expect: tuple[str, ...]  # words the error line must hold
    kind: str = "cli"  # cli (in-process entry point) | process (a real process) | api (a library call)
    mount: dict | None = None  # a tmpfs at <case>/mnt: {"size": "128k", "read_only": bool, "fill": bool}
    patch: Callable | None = None  # (monkeypatch) -> None, before the command
    check: Callable[[Ctx], None] | None = None  # what else must hold afterwards
    skip: Callable[[], str | None] | None = None  # a reason to skip here, or None


def no_results(out_name: str = "run") -> Callable[[Ctx], None]:
    """A failed fresh run leaves no metrics.json and no bundle (nothing that looks finished)."""

    def check(ctx: Ctx) -> None:
        out = ctx.root / out_name
        assert not (out / "metrics.json").exists() and not (out / "bundle").exists()

    return check


def untouched_run(out_name: str = "run") -> Callable[[Ctx], None]:
    """Nothing new in the run folder either: no staging or temporary files left behind."""

    def check(ctx: Ctx) -> None:
        out = ctx.root / out_name
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith(".") and p.name != MARKER)
        assert not left, f"left behind: {left}"

    return check


def no_cuda() -> str | None:
    return "a CUDA GPU is visible here" if torch.cuda.is_available() else None


# Setups ------------------------------------------------------------------------------------------------------


def edit_manifest(change: Callable[[dict], None], command: str = "predict") -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        run = ctx.run()
        path, m = ctx.manifest(run)
        change(m)
        path.write_text(json.dumps(m, indent=2))
        if command == "info":
            return ["info", run]
        if command == "eval":
            return ["eval", run, "--data", ctx.base.tiles, "--out", ctx.root / "ev"]
        return ["predict", run, ctx.base.tiles / "test", "--out", ctx.root / "p.csv"]

    return setup


def rotate_classes(m: dict) -> None:
    m["class_names"] = m["class_names"][1:] + m["class_names"][:1]


def resume_with(*extra) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ctx.train(ctx.unfinished(), "--resume", *extra)

    return setup


def train_with(*extra) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ctx.train(ctx.root / "run", *extra)

    return setup


def train_on(make_data: Callable[[Ctx], Path], *extra) -> Callable[[Ctx], list]:
    """Train into a fresh folder on the data ``make_data`` writes."""

    def setup(ctx: Ctx) -> list:
        return with_data(ctx.train(ctx.root / "run", *extra), make_data(ctx))

    return setup


def with_data(args: list, data: Path) -> list:
    args = list(args)
    args[args.index("--data") + 1] = data
    return args


def csv_manifest(rows: list[tuple[str, str, str]]) -> Callable[[Ctx], Path]:
    """A CSV over the shared tiles: every image once in its own split, plus ``rows`` (path, label, split)."""

    def make(ctx: Ctx) -> Path:
        tiles = ctx.base.tiles
        lines = ["path,label,split"]
        for p in sorted(tiles.rglob("*.png")):
            split, cls = p.relative_to(tiles).parts[:2]
            lines.append(f"{p},{cls},{split}")
        lines += [f"{tiles / p},{label},{split}" for p, label, split in rows]
        path = ctx.root / "manifest.csv"
        path.write_text("\n".join(lines) + "\n")
        return path

    return make


def copied_into(src: str, dst: str) -> Callable[[Ctx], Path]:
    """A copy of the tiles with one image copied byte for byte to another place."""

    def make(ctx: Ctx) -> Path:
        tiles = ctx.tiles()
        (tiles / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiles / src, tiles / dst)
        return tiles

    return make


def single_class(ctx: Ctx) -> Path:
    root = ctx.root / "one"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            write_image(root / split / "tumour" / f"{i}.png", (200, 40, 40), rng)
    return root


def unseen_val_label(ctx: Ctx) -> Path:
    tiles = ctx.tiles()
    shutil.rmtree(tiles / "train" / "red")
    return tiles


def corrupt_tiff(ctx: Ctx) -> Path:
    import tifffile

    tiles = ctx.tiles()

    good = tiles / "train" / "red" / "whole.tif"
    tifffile.imwrite(good, np.zeros((64, 64, 3), np.uint8), tile=(16, 16), compression="zlib")
    data = good.read_bytes()
    (tiles / "train" / "red" / "cut.tif").write_bytes(data[: len(data) // 2])
    good.unlink()
    return tiles


def other_backbone_bundle(ctx: Ctx) -> list:
    from pathotune import create_model, save_bundle

    run = ctx.run()
    names = json.loads((run / "bundle" / "manifest.json").read_text())["class_names"]
    from pathotune import Task

    other = create_model(
        "vit_tiny_patch16_224",
        "linear",
        len(names),
        task=Task(classes=tuple(names)),
        image_size=32,
        backbone_kwargs=TINY2,
    )
    save_bundle(other, ctx.root / "other")
    images, out = ctx.base.tiles / "test", ctx.root / "p.csv"
    return ["predict", "--bundle", run, "--bundle", ctx.root / "other", images, "--out", out]


def other_class_count_checkpoint(ctx: Ctx) -> list:
    """A checkpoint whose settings match but whose head has 3 classes, resumed on data that now has 2."""
    run = ctx.unfinished()
    tiles = ctx.tiles()
    ck_path = run / "checkpoints" / "last.pt"
    ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    ck["config"]["data"] = str(tiles)
    torch.save(ck, ck_path)
    shutil.rmtree(tiles / "train" / "red")
    shutil.rmtree(tiles / "val" / "red")
    shutil.rmtree(tiles / "test" / "red")
    return with_data(ctx.train(run, "--resume"), tiles)


def enospc(target: str) -> Callable:
    """Make one kind of write fail as a full disk does."""

    def patch(monkeypatch) -> None:
        import errno

        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        if target == "bundle":
            from safetensors import SafetensorError

            def st_full(*a, **k):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

            monkeypatch.setattr("pathotune.bundle.save_file", st_full)
        elif target == "figure":
            monkeypatch.setattr("matplotlib.figure.Figure.savefig", full)
        elif target == "text":
            from pathlib import Path as P

            real = P.write_bytes

            def write_bytes(self, data):
                if self.name.startswith(".predictions.csv"):
                    full()
                return real(self, data)

            monkeypatch.setattr(P, "write_bytes", write_bytes)

    return patch


def save_onto_existing(ctx: Ctx) -> Callable[[], object]:
    from pathotune import load_bundle, save_bundle

    run = ctx.run()
    model = load_bundle(run / "bundle")
    return lambda: save_bundle(model, run / "bundle")


def save_onto_file(ctx: Ctx) -> Callable[[], object]:
    from pathotune import load_bundle, save_bundle

    run = ctx.run()
    model = load_bundle(run / "bundle")
    (ctx.root / "notes.txt").write_text("mine")
    return lambda: save_bundle(model, ctx.root / "notes.txt", overwrite=True)


def save_overwrite_onto_folder(ctx: Ctx) -> Callable[[], object]:
    from pathotune import load_bundle, save_bundle

    run = ctx.run()
    model = load_bundle(run / "bundle")
    (ctx.root / "docs").mkdir()
    (ctx.root / "docs" / "a.txt").write_text("mine")
    return lambda: save_bundle(model, ctx.root / "docs", overwrite=True)


def create_with_classes(n: int) -> Callable[[Ctx], Callable[[], object]]:
    def setup(ctx: Ctx) -> Callable[[], object]:
        from pathotune import create_model

        return lambda: create_model("vit_small_patch16_224", "linear", n, image_size=32, backbone_kwargs={"depth": 1})

    return setup


def load_edited(ctx: Ctx) -> Callable[[], object]:
    from pathotune import load_bundle

    run = ctx.run()
    path, m = ctx.manifest(run)
    m["task"]["organ"] = "brain"
    path.write_text(json.dumps(m))
    return lambda: load_bundle(run / "bundle")


def api_switch_type(ctx: Ctx) -> Callable[[], object]:
    from pathotune import Switches

    return lambda: Switches(ivp_tokens="4")


def api_image_size(ctx: Ctx) -> Callable[[], object]:
    from pathotune import create_model

    return lambda: create_model("vit_small_patch16_224", "linear", 2, image_size=40, backbone_kwargs={"depth": 1})


def garbage_checkpoint(ctx: Ctx) -> list:
    run = ctx.unfinished()
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint" * 10)
    return ctx.train(run, "--resume")


def stale_outputs(ctx: Ctx) -> list:
    out = ctx.root / "run"
    out.mkdir()
    (out / "report.md").write_text("# my own notes, not a run\n")
    shutil.copytree(ctx.base.run / "bundle", out / "bundle")
    return ctx.train(out)


def users_config_yaml(ctx: Ctx) -> list:
    """``--config config.yaml --out .``: the user's own config.yaml must not be replaced by the resolved one."""
    shutil.copyfile(ctx.base.cfg, ctx.root / "config.yaml")
    args = ctx.train(ctx.root)
    args[args.index("--config") + 1] = ctx.root / "config.yaml"
    return args


def out_is_file(ctx: Ctx) -> list:
    (ctx.root / "run").write_text("a file, not a folder")
    return ctx.train(ctx.root / "run")


def out_under_file(ctx: Ctx) -> list:
    (ctx.root / "notes.txt").write_text("a file")
    return ctx.train(ctx.root / "notes.txt" / "run")


def seeds_into_finished(ctx: Ctx) -> list:
    return ctx.train(ctx.run(), "--seeds", "0", "1")


def eval_into_other_results(ctx: Ctx) -> list:
    run = ctx.run()
    other = run / "eval" / "tiles-test"
    other.mkdir(parents=True)
    (other / "metrics.json").write_text(json.dumps({"evaluation": True, "bundle": "elsewhere", "data": "x"}))
    return ["eval", run, "--data", ctx.base.tiles, "--out", run]


def yaml_list_config(ctx: Ctx) -> list:
    cfg = ctx.root / "cfg.yaml"
    cfg.write_text("- backbone\n- method\n")
    args = ctx.train(ctx.root / "run")
    args[args.index("--config") + 1] = cfg
    return args


def config_with(**keys) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        import yaml

        cfg = ctx.root / "cfg.yaml"
        data = yaml.safe_load(ctx.base.cfg.read_text())
        data.update(keys)
        cfg.write_text(yaml.safe_dump(data))
        args = ctx.train(ctx.root / "run")
        args[args.index("--config") + 1] = cfg
        return args

    return setup


def overwrite_with(*extra) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ctx.train(ctx.run(), "--overwrite", *extra)

    return setup


def bad_image_for_predict(ctx: Ctx) -> list:
    folder = ctx.root / "imgs"
    folder.mkdir()
    shutil.copyfile(ctx.base.tiles / "test" / "red" / "test_red_0.png", folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return ["predict", ctx.run(), folder, "--out", ctx.root / "p.csv"]


RED0 = "train/red/train_red_0.png"

CASES: list[Case] = [
    # A finished run is a record -------------------------------------------------------------------------------
    Case("train_into_finished_run", lambda c: c.train(c.run()), ("holds a finished run", "--overwrite")),
    Case("train_into_unfinished_run", lambda c: c.train(c.unfinished()), ("unfinished run", "--resume")),
    Case("train_into_stale_outputs", stale_outputs, ("already holds run outputs", "report.md")),
    Case("seeds_into_finished_run", seeds_into_finished, ("holds a finished run",)),
    Case("train_into_a_folder_with_my_config_yaml", users_config_yaml, ("already holds run outputs", "config.yaml")),
    Case(
        "overwrite_rerun_that_diverges",
        overwrite_with("--lr", "1e30", "--head-lr", "1e30"),
        ("non-finite", "nothing was replaced", "still holds the previous run"),
        check=untouched_run(),
    ),
    Case(
        "overwrite_rerun_that_explodes",
        overwrite_with("--lr", "1e6", "--head-lr", "1e6", "--eval-every", "1"),
        ("nothing was replaced",),
        check=untouched_run(),
    ),
    Case(
        "overwrite_rerun_with_missing_data",
        lambda c: with_data(c.train(c.run(), "--overwrite"), c.root / "nowhere"),
        ("does not exist",),
        check=untouched_run(),
    ),
    Case(
        "overwrite_rerun_disk_full_at_bundle",
        overwrite_with("--method", "linear"),
        ("prompts.safetensors", "No space left on device", "intact", "nothing was replaced"),
        patch=enospc("bundle"),
        check=untouched_run(),
    ),
    Case("resume_and_overwrite_together", lambda c: c.train(c.run(), "--resume", "--overwrite"), ("exclude",)),
    # --resume under other settings ------------------------------------------------------------------------------
    Case("resume_with_other_lr", resume_with("--lr", "0.1"), ("cannot resume", "lr 0.003 -> 0.1")),
    Case("resume_with_other_head_lr", resume_with("--head-lr", "0.5"), ("cannot resume", "head_lr")),
    Case("resume_with_other_method", resume_with("--method", "vpt-deep"), ("cannot resume", "method")),
    Case("resume_with_other_seed", resume_with("--seed", "7"), ("cannot resume", "seed 0 -> 7")),
    Case("resume_with_other_steps", resume_with("--steps", "9"), ("cannot resume", "steps 2 -> 9")),
    Case("resume_with_other_switch", resume_with("--switch", "tvp_tokens=3"), ("switches.tvp_tokens",)),
    Case("resume_with_other_batch_size", resume_with("--batch-size", "4"), ("batch_size 8 -> 4",)),
    Case("resume_with_other_augment", resume_with("--augment", "pathology"), ("augment",)),
    Case("resume_with_other_image_size", resume_with("--image-size", "48"), ("image_size 32 -> 48",)),
    Case("resume_unreadable_checkpoint", garbage_checkpoint, ("checkpoint", "unreadable")),
    Case(
        "resume_checkpoint_of_other_class_count",
        other_class_count_checkpoint,
        ("written for another model", "class count"),
    ),
    # Degenerate training ---------------------------------------------------------------------------------------
    Case("epochs_0", train_with("--epochs", "0"), ("epochs",)),
    Case("epochs_negative", train_with("--epochs", "-1"), ("epochs",)),
    Case("steps_0", train_with("--steps", "0"), ("steps", ">= 1")),
    Case("steps_and_epochs", train_with("--steps", "2", "--epochs", "2"), ("--steps or --epochs",)),
    Case("eval_every_0", train_with("--eval-every", "0"), ("eval_every",)),
    Case("batch_size_0", train_with("--batch-size", "0"), ("batch_size",)),
    Case("image_size_negative", train_with("--image-size", "-32"), ("image_size", "positive")),
    Case("image_size_zero", train_with("--image-size", "0"), ("image_size",)),
    Case("image_size_not_a_patch_multiple", train_with("--image-size", "33"), ("multiple of the patch size 16",)),
    Case("num_workers_negative", train_with("--num-workers", "-1"), ("num_workers", ">= 0")),
    Case("seed_negative", train_with("--seed", "-3"), ("seed", ">= 0")),
    Case("lr_negative", train_with("--lr", "-0.1"), ("lr",)),
    Case("lr_infinite", train_with("--lr", "inf"), ("key 'lr'", "finite number")),
    Case("head_lr_nan", train_with("--head-lr", "nan"), ("head_lr",)),
    Case("val_fraction_above_1", train_with("--val-fraction", "1.5"), ("val_fraction",)),
    Case("warmup_fraction_1", config_with(warmup_fraction=1.0), ("warmup_fraction",)),
    Case("bootstrap_negative", config_with(bootstrap=-5), ("bootstrap",)),
    Case("num_nodes_0", train_with("--num-nodes", "0"), ("num_nodes",)),
    Case(
        "single_class_dataset",
        train_on(single_class),
        ("1 class", "at least 2 classes"),
        check=no_results(),
    ),
    Case(
        "lr_1e30_non_finite",
        train_with("--lr", "1e30", "--head-lr", "1e30"),
        ("non-finite", "last good checkpoint is kept"),
        check=no_results(),
    ),
    Case(
        "lr_1e6_explodes",
        train_with("--lr", "1e6", "--head-lr", "1e6", "--steps", "4", "--eval-every", "1"),
        ("diverged", "lower --lr"),
        check=no_results(),
    ),
    # Data leaks and double counting --------------------------------------------------------------------------
    Case(
        "csv_file_in_two_splits",
        train_on(csv_manifest([(RED0, "red", "test")])),
        ("train_red_0.png", "split train", "test", "leak"),
        check=no_results(),
    ),
    Case(
        "csv_file_under_two_labels",
        train_on(csv_manifest([(RED0, "blue", "train")])),
        ("train_red_0.png", "label 'red'", "'blue'"),
    ),
    Case(
        "copied_file_in_train_and_test",
        train_on(copied_into(RED0, "test/red/copy.png")),
        ("more than one split", "copy.png", "train_red_0.png"),
        check=no_results(),
    ),
    Case(
        "copied_file_in_train_and_val",
        train_on(copied_into(RED0, "val/red/copy.png")),
        ("leak into evaluation",),
    ),
    Case(
        "copied_file_under_two_labels",
        train_on(copied_into(RED0, "train/blue/copy.png")),
        ("more than one label", "'blue'", "'red'"),
    ),
    Case(
        "eval_data_with_a_leak",
        lambda c: ["eval", c.run(), "--data", copied_into(RED0, "test/red/copy.png")(c), "--out", c.root / "ev"],
        ("more than one split",),
    ),
    # Bundles: edited or incomplete manifests, mixed backbones ---------------------------------------------------
    Case("predict_rotated_classes", edit_manifest(rotate_classes), ("changed after it was written",)),
    Case("eval_rotated_classes", edit_manifest(rotate_classes, "eval"), ("changed after it was written",)),
    Case("info_rotated_classes", edit_manifest(rotate_classes, "info"), ("changed after it was written",)),
    Case(
        "predict_edited_task",
        edit_manifest(lambda m: m["task"].update(organ="brain")),
        ("changed after it was written",),
    ),
    Case(
        "predict_edited_switches",
        edit_manifest(lambda m: m["switches"].update(prompt_attn="joint")),
        ("changed after it was written",),
    ),
    Case(
        "predict_edited_normalisation",
        edit_manifest(lambda m: m["normalization"].update(mean=[0.0, 0.0, 0.0])),
        ("changed after it was written",),
    ),
    Case(
        "predict_edited_tensor_checksum",
        edit_manifest(lambda m: m.update(sha256="0" * 64)),
        ("changed after it was written",),
    ),
    Case("predict_manifest_without_provenance", edit_manifest(lambda m: m.pop("provenance")), ("'provenance'",)),
    Case("predict_manifest_without_tensors", edit_manifest(lambda m: m.pop("tensors")), ("'tensors'",)),
    Case("info_manifest_without_provenance", edit_manifest(lambda m: m.pop("provenance"), "info"), ("'provenance'",)),
    Case("info_manifest_without_tensors", edit_manifest(lambda m: m.pop("tensors"), "info"), ("'tensors'",)),
    Case(
        "info_format_1_without_provenance",
        edit_manifest(lambda m: (m.pop("provenance"), m.pop("manifest_sha256"), m.update(format_version=1)), "info"),
        ("'provenance'",),
    ),
    Case("predict_newer_format", edit_manifest(lambda m: m.update(format_version=99)), ("upgrade pathotune",)),
    Case(
        "predict_manifest_not_json",
        lambda c: (lambda r: ((r / "bundle" / "manifest.json").write_text("{oops"), ["predict", r, c.base.tiles])[1])(
            c.run()
        ),
        ("manifest", "corrupt"),
    ),
    Case(
        "predict_corrupt_tensors",
        lambda c: (lambda r: (_flip(r / "bundle" / "prompts.safetensors"), ["predict", r, c.base.tiles])[1])(c.run()),
        ("corrupt",),
    ),
    Case("predict_bundles_of_two_backbones", other_backbone_bundle, ("different backbones", "vit_tiny_patch16_224")),
    Case("predict_bad_image", bad_image_for_predict, ("b.png",)),
    Case("predict_out_is_a_folder", lambda c: ["predict", c.run(), c.base.tiles, "--out", c.root], ("is a folder",)),
    Case(
        "predict_over_a_runs_predictions",
        lambda c: (lambda r: ["predict", r, c.base.tiles / "test", "--out", r / "predictions.csv"])(c.run()),
        ("training outputs",),
    ),
    Case("info_on_a_plain_folder", lambda c: ["info", c.root], ("no manifest.json",)),
    Case(
        "eval_out_is_a_file",
        lambda c: ["eval", c.run(), "--data", c.base.tiles, "--out", c.base.cfg],
        ("is a file",),
    ),
    Case("eval_into_other_results_in_a_run", eval_into_other_results, ("already holds other results",)),
    # Tracebacks that must be one line ---------------------------------------------------------------------------
    Case("precision_bad_value", train_with("--precision", "bogus"), ("precision", "32-true")),
    # flags built from the config's fields (cli/config_flags.py): a bad value names the flag, before any work
    Case(
        "generated_flag_not_a_number",
        train_with("--probe-views", "two"),
        ("'--probe-views'", "integer"),
        check=no_results(),
    ),
    Case(  # the flag's type passes and the config's validator refuses: the line names the flag, not the key alone
        "generated_flag_rejected_by_the_config",
        train_with("--probe-views", "-1"),
        ("Invalid value for '--probe-views'", "must be >= 0"),
        check=no_results(),
    ),
    Case(
        "generated_flag_bad_choice",
        train_with("--selection", "bogus"),
        ("'--selection'", "'significant', 'best', 'cv'"),
    ),
    Case("devices_not_a_number", train_with("--devices", "abc"), ("devices", "'auto'")),
    Case("devices_0", train_with("--devices", "0"), ("devices",)),
    Case("accelerator_unknown", train_with("--accelerator", "quantum"), ("accelerator",)),
    Case("accelerator_gpu_without_one", train_with("--accelerator", "gpu"), ("no CUDA GPU",), skip=no_cuda),
    Case("strategy_unknown", train_with("--strategy", "bogus"), ("strategy", "cannot run here")),
    Case("switch_count_not_a_number", train_with("--switch", "tvp_tokens=many"), ("tvp_tokens", "integer")),
    Case("switch_flag_not_a_bool", train_with("--switch", "tvp_deep=7"), ("tvp_deep", "true or false")),
    Case("switch_unknown", train_with("--switch", "colour=red"), ("unknown switch",)),
    Case("switch_not_key_value", train_with("--switch", "tvp_tokens"), ("KEY=VALUE",)),
    Case("steps_not_a_number", train_with("--steps", "abc"), ("--steps",)),
    Case("unknown_flag", train_with("--colour", "red"), ("No such option",)),
    Case("config_not_a_mapping", yaml_list_config, ("mapping",)),
    Case("out_is_a_file", out_is_file, ("is a file, not a folder",)),
    Case("out_under_a_file", out_under_file, ("which is a file",)),
    Case(
        "out_read_only",
        lambda c: c.train(c.root / "mnt" / "run"),
        ("read-only",),
        mount={"size": "1m", "read_only": True},
    ),
    Case(
        "disk_full_at_the_first_checkpoint",
        lambda c: c.train(c.root / "mnt" / "run"),
        ("checkpoints/last.pt", "No space left on device", "intact"),
        mount={"size": "128k"},
    ),
    Case(
        "disk_full_writing_predictions_csv",
        lambda c: ["predict", c.run(), c.base.tiles / "test", "--out", c.root / "mnt" / "p.csv"],
        ("p.csv", "No space left on device"),
        mount={"size": "64k", "fill": True},
    ),
    Case(
        "disk_full_writing_eval_report",
        lambda c: ["eval", c.run(), "--data", c.base.tiles, "--out", c.root / "mnt" / "ev"],
        ("No space left on device", "intact"),
        mount={"size": "64k", "fill": True},
    ),
    Case(
        "disk_full_at_the_bundle",
        train_with("--method", "linear"),
        ("bundle/prompts.safetensors", "No space left on device", "intact"),
        patch=enospc("bundle"),
        check=no_results(),
    ),
    Case(
        "disk_full_at_a_figure",
        train_with("--method", "linear"),
        ("confusion_matrix.png", "No space left on device"),
        patch=enospc("figure"),
        check=no_results(),
    ),
    Case(
        "disk_full_at_predictions_csv",
        train_with("--method", "linear"),
        ("predictions.csv", "No space left on device"),
        patch=enospc("text"),
        check=no_results(),
    ),
    # Warnings and progress bars must not come before the error line (real processes) ---------------------------
    Case(
        "unseen_label_warning_then_error",
        train_on(unseen_val_label, "--method", "linear"),
        ("red",),
        kind="process",
    ),
    Case(
        "truncated_tiff_warnings_then_error",
        train_on(corrupt_tiff, "--method", "linear"),
        ("cut.tif", "truncated"),
        kind="process",
    ),
    Case(
        "eval_on_truncated_tiff",
        lambda c: ["eval", c.run(), "--data", corrupt_tiff(c)],
        ("cut.tif",),
        kind="process",
    ),
    # The library itself ------------------------------------------------------------------------------------------
    Case("save_bundle_onto_a_bundle", save_onto_existing, ("already exists", "overwrite=True"), kind="api"),
    Case("save_bundle_onto_a_file", save_onto_file, ("not a bundle folder",), kind="api"),
    Case("save_bundle_onto_a_folder", save_overwrite_onto_folder, ("not a bundle folder",), kind="api"),
    Case("create_model_0_classes", create_with_classes(0), ("num_classes", ">= 2"), kind="api"),
    Case("create_model_1_class", create_with_classes(1), ("num_classes",), kind="api"),
    Case("load_bundle_edited_task", load_edited, ("changed after it was written",), kind="api"),
    Case("switch_of_the_wrong_type", api_switch_type, ("ivp_tokens", "integer"), kind="api"),
    Case("create_model_image_size", api_image_size, ("multiple of the patch size",), kind="api"),
]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case: Case, base: Base, tmp_path: Path, monkeypatch, capsys, can_mount) -> None:
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    if case.mount is not None and can_mount is not None:
        pytest.skip(can_mount)
    root = tmp_path / "case"
    root.mkdir()
    ctx = Ctx(root, base)
    if case.mount is not None:
        with tmpfs(root / "mnt", **case.mount):
            _run_case(case, ctx, monkeypatch, capsys)
    else:
        _run_case(case, ctx, monkeypatch, capsys)


def _run_case(case: Case, ctx: Ctx, monkeypatch, capsys) -> None:
    command = case.setup(ctx)
    before = sha_tree(ctx.root, ctx.base.root)
    if case.patch is not None:
        case.patch(monkeypatch)
    if case.kind == "api":
        with pytest.raises(PathoTuneError) as exc:
            command()
        line = str(exc.value)
        assert "\n" not in line, line
    elif case.kind == "process":
        env = cli_env()
        env.pop("PYTHONWARNINGS", None)  # warnings must be held back by pathotune itself
        proc = subprocess.run(cli_cmd(*command), capture_output=True, text=True, env=env, timeout=300, check=False)
        assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        line = one_line_error(proc.stderr)
        assert "Traceback" not in proc.stdout
    else:
        code, out, err = run_main(monkeypatch, capsys, *command)
        assert code == 2, f"exit {code}\n{out}\n{err}"
        line = one_line_error(err)
        assert "Traceback" not in out
    for word in case.expect:
        assert word in line, f"{word!r} not in: {line}"
    after = sha_tree(ctx.root, ctx.base.root)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"files changed or lost: {changed}"
    if case.check is not None:
        case.check(ctx)


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
