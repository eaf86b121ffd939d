"""A run folder is a record: nothing in it may describe another run than its neighbours, and nothing finished
is replaced unless asked.

``open_run_folder`` decides, before any work, what a training run may do with ``--out``:

- absent, empty, or holding only files that are not run outputs (or only the ``config.yaml`` of a start that
  never reached a checkpoint): train there directly;
- a finished run (``metrics.json``): refused; ``--resume`` is a no-op that says so; ``--overwrite`` builds the new
  run in a hidden staging folder inside ``--out`` and swaps it in only once it has finished;
- an unfinished run (a checkpoint, or seed sub-runs): refused; ``--resume`` continues it in place, after checking
  that the settings match the ones its checkpoint was written under; ``--overwrite`` stages as above;
- run outputs with neither (``bundle/`` or ``report.md`` of a run killed while writing them): refused;
  ``--overwrite`` (or ``--resume``, which then starts fresh) stages.

A failed staged run is deleted and the old run is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core.checkpoint import load_checkpoint
from ..core.loop import TrainingError
from ..errors import ConfigError, PathoTuneError, describe_os_error, write_error
from ..records import KINDS, check_out_usable, kind_of, recover, refuse_existing, swap_in, write_marker
from .config import TrainConfig

CHECKPOINT = Path("checkpoints") / "last.pt"
FINAL = ".pathotune-final"  # a run's final outputs, moved into its folder together once all are written
STAGING = ".pathotune-staging"  # inside --out (records.STAGING): the swap never crosses a file system
# What a training run writes into its folder (and ``eval RUN --out RUN`` beneath it).
RUN_OUTPUTS = frozenset(
    ("config.yaml", "metrics.json", "report.md", "log.csv", "predictions.csv")
    + ("bundle", "checkpoints", "figures", "eval", "logs")
)
_SEED_DIR = re.compile(r"seed_\d+")
# Settings that cannot change what a resumed run computes: where it writes, loader processes, how many
# bootstrap resamples the final confidence intervals use, where its curves are logged.
# tta only adds scores after training: it never changes the trajectory
HARMLESS_ON_RESUME = frozenset({"out", "resume", "overwrite", "num_workers", "bootstrap", "logger", "tta"})
RECIPE_KEYS = ("lr", "head_lr", "weight_decay", "min_steps", "warmup_fraction", "head_init")


def is_run_output(name: str) -> bool:
    return name in RUN_OUTPUTS or bool(_SEED_DIR.fullmatch(name))


def run_state(out: Path) -> str:
    """absent | fresh | finished | unfinished | stale (see the module docstring)."""
    if not out.is_dir():
        return "absent"
    if (out / "metrics.json").is_file():
        return "finished"
    entries = [e for e in out.iterdir() if not e.name.startswith(".")]
    seeds = [e for e in entries if e.is_dir() and _SEED_DIR.fullmatch(e.name)]
    if (out / CHECKPOINT).is_file() or any((s / "metrics.json").is_file() or (s / CHECKPOINT).is_file() for s in seeds):
        return "unfinished"
    outputs = sorted(e.name for e in entries if is_run_output(e.name) and not _empty_dir(e))
    if outputs == [] or (outputs == ["config.yaml"] and _is_resolved_config(out / "config.yaml")):
        return "fresh"  # nothing, or only the config of a start that never reached its first checkpoint
    return "stale"


def _is_resolved_config(path: Path) -> bool:
    """Whether ``path`` is a config.yaml that a run wrote (every key resolved), not a user's own config file."""

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and set(TrainConfig.model_fields) <= set(data)


def _empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def _contents(out: Path) -> str:
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir() if is_run_output(e.name))
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


@dataclass
class RunFolder:
    """Where a run writes (``workdir``) and how its folder ends: in place, or swapped in from staging."""

    out: Path
    workdir: Path
    staged: bool = False
    resume: bool = False  # continue from a checkpoint in ``workdir``
    finished: dict | None = None  # --resume of a finished run: its metrics, and nothing to do
    notes: list[str] = field(default_factory=list)

    def prepare(self, is_main: bool = True) -> None:
        """Create the staging folder (left over ones from a killed --overwrite are removed first)."""
        if self.staged and is_main:
            try:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir.mkdir(parents=True)
                write_marker(self.workdir, "train")
            except OSError as e:
                raise write_error(self.workdir, e) from e

    def finish(self, is_main: bool = True) -> None:
        """Swap a staged run in (:func:`pathotune.records.swap_in`: journaled, Ctrl-C held back); files in
        ``out`` that are not run outputs (notes, a benchmark's cell.yaml) stay where they are."""
        if self.staged and is_main:
            swap_in(self.out, self.workdir, KINDS["train"])

    def abort(self, error: BaseException, is_main: bool = True) -> BaseException:
        """After a failure: a staged run is deleted, and its error says that the old run is unchanged."""
        if not self.staged:
            return error
        if is_main:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if not isinstance(error, PathoTuneError):
            return error
        kept = f"nothing was replaced: {self.out} still holds the previous run, unchanged"

        if isinstance(error, TrainingError):
            reason = error.reason.replace(str(self.workdir), str(self.out))
            new: BaseException = TrainingError(reason, kept, error.advice)
        else:
            new = type(error)(f"{str(error).replace(str(self.workdir), str(self.out))}; {kept}")
        new.__cause__ = error
        return new

    @contextmanager
    def staged_run(self, is_main: bool, barrier: Callable[[], None]) -> Iterator[Path]:
        """prepare -> the run writes into the yielded folder -> finish (swap in); on any failure, abort."""
        self.prepare(is_main)
        try:
            yield self.workdir
            barrier()
            self.finish(is_main)
        except BaseException as e:
            err = self.abort(e, is_main)
            if err is e:
                raise
            raise err from e


def open_run_folder(out: str | Path, resume: bool, overwrite: bool, checkpoint: Path = CHECKPOINT) -> RunFolder:
    """What a run may do with ``out`` (see the module docstring); raises when it may do nothing. A replacement
    interrupted mid-swap is rolled back first (:func:`pathotune.records.recover`)."""
    out = Path(out)
    check_out_usable(out)
    note = recover(out) if out.is_dir() else None
    folder = _open(out, resume, overwrite)
    if note:
        folder.notes.insert(0, note)
    return folder


def _open(out: Path, resume: bool, overwrite: bool) -> RunFolder:
    held = kind_of(out)
    if held is not None and held is not KINDS["train"]:  # another command's record: never mixed with a run
        refuse_existing(out, KINDS["train"], overwrite, "run")
        return RunFolder(out, out / STAGING, staged=True)
    state = run_state(out)
    staged = RunFolder(out, out / STAGING, staged=True)
    direct = RunFolder(out, out)
    if state in ("absent", "fresh"):
        if resume:
            direct.notes.append(f"note: no checkpoint in {out}; --resume starts a fresh run")
        return direct
    if state == "finished":
        if resume:
            try:
                metrics = json.loads((out / "metrics.json").read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{out}/metrics.json is unreadable ({describe_os_error(e)}); check it") from e
            direct.finished = metrics
            direct.notes.append(f"{out} holds a finished run (metrics.json); nothing to resume")
            return direct
        if overwrite:
            return staged
        raise ConfigError(
            f"{out} holds a finished run ({_contents(out)}); it is kept as a record: pass another --out, or "
            "--overwrite to replace it once the new run has finished"
        )
    if state == "unfinished":
        if resume:
            direct.resume = True
            return direct
        if overwrite:
            return staged
        raise ConfigError(
            f"{out} holds an unfinished run (a checkpoint, no metrics.json); pass --resume to continue it with "
            "the same settings, or --overwrite to start over (the old run stays until the new one finishes)"
        )
    # stale: run outputs but no checkpoint and no metrics.json
    if resume:
        staged.notes.append(f"note: no checkpoint in {out}; --resume starts a fresh run")
        return staged
    if overwrite:
        return staged
    raise ConfigError(
        f"{out} already holds run outputs ({_contents(out)}) without a checkpoint or metrics.json; pass another "
        "--out, or --overwrite to replace them once the new run has finished"
    )


_DEFAULTS = {k: f.get_default(call_default_factory=True) for k, f in TrainConfig.model_fields.items()}
_DEFAULTS = {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in _DEFAULTS.items()}


def settings_changed(old: dict, new: dict, old_recipe: dict | None, new_recipe: dict) -> list[str]:
    """The settings that differ between a checkpoint's config and this run's, in ``key old -> new`` form.

    Keys that cannot change the trajectory are ignored; learning rates and the like compare as resolved
    (an explicit ``--lr`` equal to the method's default is no change).
    """
    changed = []
    for key in list(new) + [k for k in old if k not in new]:  # in the config's own order: data, backbone, method...
        if key in HARMLESS_ON_RESUME:
            continue
        if key in RECIPE_KEYS and old_recipe is not None:
            a, b = old_recipe.get(key), new_recipe.get(key)
        else:  # a key the old config predates had its default then
            a, b = old.get(key, _DEFAULTS.get(key)), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            a = {**(_DEFAULTS.get(key) or {}), **a} if isinstance(_DEFAULTS.get(key), dict) else a
            changed += [
                f"{key}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
        elif a != b:
            changed.append(f"{key} {a!r} -> {b!r}")
    return changed


@contextmanager
def final_outputs(out: Path) -> Iterator[Path]:
    """A hidden folder for a run's final outputs (bundle, log, predictions, report, metrics.json); they move into
    ``out`` together once every one is written, metrics.json last. When any write fails, none of them appears
    (the error names the file as it would have been in ``out``), and what was there before is intact.
    """
    tmp = out / FINAL
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise write_error(tmp, e) from e
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir() if p.name != "metrics.json")
        for name in [*names, "metrics.json"] if (tmp / "metrics.json").exists() else names:
            dst = out / name
            if dst.is_dir() and not dst.is_symlink():  # this run's own older output (a resumed run)
                old = out / f".{name}.replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dst, old)
                os.replace(tmp / name, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp / name, dst)
    except PathoTuneError as e:
        raise type(e)(str(e).replace(str(tmp), str(out))) from e
    except OSError as e:
        raise write_error(out, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_resume_settings(cfg: TrainConfig, ckpt: Path, recipe: dict) -> None:
    """Refuse to resume under settings that change the trajectory from those the checkpoint was written under."""
    ck = load_checkpoint(ckpt)
    old, old_recipe = ck.get("config"), ck.get("recipe")
    if not isinstance(old, dict):  # a checkpoint from before configs were stored: the folder's config.yaml
        try:
            old = yaml.safe_load((ckpt.parent.parent / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            old = None
    if not isinstance(old, dict):
        return
    changed = settings_changed(old, cfg.model_dump(mode="json"), old_recipe, recipe)
    if changed:
        shown = "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
        raise ConfigError(
            f"cannot resume {cfg.out}: its checkpoint was written under other settings that change training "
            f"({shown}); resume with the original values (see {Path(cfg.out) / 'config.yaml'}) or start over "
            "with --overwrite"
        )
