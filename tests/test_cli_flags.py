"""`pathotune train`'s flags come from TrainConfig's fields (cli/config_flags.py): every exposed field has a flag
and help, the flags given reach the config, a value the config rejects names its flag, every option of every
command has help, and --precision has one default and one help text wherever it appears."""

from __future__ import annotations

import typing

import pytest
import typer
import typer.main
from helpers import one_line_error, run_main

from pathotune.cli.config_flags import _flag_type, _without_none, flag_names, flags_of, overrides
from pathotune.cli.main import app
from pathotune.engine.config import DEFAULT_PRECISION, PRECISION_HELP, ProbeConfig, TaskConfig, TrainConfig

# The flags train had before they were generated: each keeps its name, and the plain flags stay plain.
LEGACY = (
    *("--data", "--backbone", "--method", "--config", "--weights", "--steps", "--epochs", "--eval-every"),
    *("--batch-size", "--image-size", "--lr", "--head-lr", "--seed", "--seeds", "--task-text", "--organ"),
    *("--stain", "--val-fraction", "--test-fraction", "--augment", "--switch", "--head-init", "--probe-refit"),
    *("--skip-bad", "--split-seed", "--tta", "--probe-features", "--probe-c", "--probe-views", "--selection"),
    *("--text-control", "--num-workers", "--devices", "--accelerator", "--strategy", "--num-nodes", "--precision"),
    *("--out", "--resume", "--overwrite", "--logger", "--quiet", "--json"),
)
PLAIN_FLAGS = ("--tta", "--resume", "--overwrite", "--probe-refit", "--skip-bad", "--quiet", "--json")
MULTIPLE = ("--seeds", "--switch", "--logger")


def commands(group=None, path: str = "pathotune"):
    """(command path, click command) for every command, groups walked."""
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, f"{path} {name}")
        else:
            yield f"{path} {name}", cmd


def train_params() -> dict:
    cmd = typer.main.get_command(app).commands["train"]
    return {opt: p for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def exposed_fields() -> list[str]:
    """Dotted paths of the fields the module docstring's rule exposes, read from the models here."""
    out = []
    for model, prefix in ((TrainConfig, ""), (TaskConfig, "task."), (ProbeConfig, "probe.")):
        for key, field in model.model_fields.items():
            if _flag_type(field.annotation) is not None:
                out.append(prefix + key)
    return out


def test_every_exposed_field_has_a_flag_with_help():
    flags = {f.path: f for f in flags_of(TrainConfig)}
    params = train_params()
    missing = [p for p in exposed_fields() if p not in flags or flags[p].option not in params]
    assert not missing, f"TrainConfig fields without a train flag: {missing}"
    no_help = [f.path for f in flags.values() if not (params[f.option].help or "").strip()]
    assert not no_help, f"flags without help (give the field a description): {no_help}"
    assert {"probe.views", "task.control", "selection", "precision", "logger", "devices"} <= set(flags)


def test_every_field_has_a_description():
    """YAML-only fields too: a field's meaning is written once, on the model."""
    for model in (TrainConfig, TaskConfig, ProbeConfig):
        bare = [k for k, f in model.model_fields.items() if not (f.description or "").strip()]
        assert not bare, f"{model.__name__} fields without a description: {bare}"


def test_the_legacy_flags_keep_their_names_and_kinds():
    params = train_params()
    assert not [f for f in LEGACY if f not in params], "a flag train had is gone"
    for flag in PLAIN_FLAGS:
        assert params[flag].is_flag and not params[flag].secondary_opts, flag
    for flag in MULTIPLE:
        assert params[flag].multiple, flag
    nested = {"--task-text", "--organ", "--stain", "--text-control", "--probe-features", "--probe-c", "--probe-views"}
    assert nested <= set(params)


def test_literal_fields_list_their_choices():
    from typer.testing import CliRunner

    shown = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"}).output
    literal = 0
    for flag in flags_of(TrainConfig):
        for kind in _without_none(flag.field.annotation):
            if typing.get_origin(kind) is typing.Literal:
                literal += 1
                choices = typing.get_args(kind)
                # a Literal alone shows as <a|b|c>; within a union (probe.c: a keyword or a number) the help names them
                assert "|".join(choices) in shown or all(c in flag.field.description for c in choices), flag.option
    assert literal >= 7


def test_square_brackets_in_help_are_shown_not_read_as_markup():
    from typer.testing import CliRunner

    shown = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"}).output
    assert "hf-hub:owner/repo[@rev][:file]" in shown


@pytest.mark.parametrize("path,cmd", list(commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_option_of_every_command_has_help(path, cmd):
    bare = [p.opts[0] for p in cmd.params if isinstance(p, typer.core.TyperOption) and not (p.help or "").strip()]
    assert not bare, f"`{path}` options without help: {bare}"


def test_precision_has_one_default_and_one_help():
    seen = {}
    for path, cmd in commands():
        for p in cmd.params:
            if "--precision" in p.opts:
                seen[path] = (p.default, p.help)
    assert {"pathotune train", "pathotune eval", "pathotune predict", "pathotune slides extract"} <= set(seen)
    train_default, train_help = seen.pop("pathotune train")
    assert train_default is None  # None: the config's (or the YAML's) value stands
    assert TrainConfig.model_fields["precision"].default == DEFAULT_PRECISION
    assert train_help == PRECISION_HELP
    assert set(seen.values()) == {(DEFAULT_PRECISION, PRECISION_HELP)}, seen
    assert "auto" in PRECISION_HELP and DEFAULT_PRECISION in PRECISION_HELP


def test_overrides_nest_the_given_flags():
    given = {"probe_views": 2, "text_control": "empty", "selection": "best", "organ": None, "no_select_groups": True}
    assert overrides(TrainConfig, given) == {
        "probe": {"views": 2},
        "task": {"control": "empty"},
        "selection": "best",
        "select_groups": False,
    }
    assert overrides(TrainConfig, {"no_select_groups": None, "tta": None}) == {}


@pytest.fixture
def captured_config(monkeypatch):
    """Runs `pathotune train` up to its config: train_seeds is replaced by one that records it."""
    import pathotune.engine.run as run

    seen = []

    def fake(cfg, seeds, progress=True):
        seen.append((cfg, seeds))
        return {"trainable_params": 1, "total_params": 2}

    monkeypatch.setattr(run, "train_seeds", fake)
    return seen


def test_given_flags_reach_the_config(captured_config, tmp_path, monkeypatch, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("probe: {features: raw}\ntask: {organ: colon}\nselection: cv\n")
    args = ["train", "--config", cfg_file, "--data", "tiles", "--probe-views", "2", "--text-control", "empty"]
    args += ["--selection", "best", "--probe-c", "0.5", "--devices", "2", "--logger", "csv,tensorboard", "--tta"]
    args += ["--no-select-groups", "--switch", "tvp_tokens=4", "--seeds", "1", "--seeds", "2", "--quiet"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    (cfg, seeds), *_ = captured_config
    assert (cfg.probe.views, cfg.probe.c, cfg.probe.features) == (2, 0.5, "raw")  # the YAML's features kept
    assert (cfg.task.control, cfg.task.organ) == ("empty", "colon")
    assert (cfg.selection, cfg.devices, cfg.logger) == ("best", 2, ["csv", "tensorboard"])
    assert cfg.tta is True and cfg.select_groups is False and cfg.switches == {"tvp_tokens": 4}
    assert seeds == [1, 2]


def test_flags_not_given_keep_the_defaults(captured_config, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", "tiles", "--quiet")
    assert code == 0, err
    (cfg, seeds), *_ = captured_config
    assert cfg == TrainConfig(data="tiles") and seeds == [0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--probe-views", "-1"], ("Invalid value for '--probe-views' (key 'probe.views'): must be >= 0", "(got -1)")),
        (["--probe-c", "abc"], ("'--probe-c' (key 'probe.c'): must be val, cv, uni or a number > 0",)),
        (["--devices", "0"], ("'--devices' (key 'devices')", "'auto'")),
        (["--logger", "csv", "--logger", "neptune"], ("'--logger' (key 'logger')", "unknown logger 'neptune'")),
        (["--precision", "bogus"], ("'--precision' (key 'precision')", "32-true")),
        (["--selection-alpha", "0.7"], ("'--selection-alpha' (key 'selection_alpha'): must be in (0, 0.5)",)),
    ],
)
def test_a_value_the_config_rejects_names_its_flag(captured_config, tmp_path, monkeypatch, capsys, args, words):
    """The flag's type passes (click's check) but the model's validator refuses: the line names the flag, even
    where a YAML config is given too."""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("steps: 2\n")
    code, _, err = run_main(monkeypatch, capsys, "train", "--config", cfg_file, "--data", "tiles", *args)
    line = one_line_error(err)
    assert code == 2 and all(w in line for w in words), line
    assert str(cfg_file) not in line  # the file is not at fault
    assert not captured_config


def test_a_bad_yaml_value_still_names_the_file(captured_config, tmp_path, monkeypatch, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("probe: {views: -2, c: abc}\n")
    code, _, err = run_main(monkeypatch, capsys, "train", "--config", cfg_file, "--data", "tiles", "--probe-c", "cv")
    line = one_line_error(err)
    assert code == 2 and f"{cfg_file}: key 'probe.views': must be >= 0" in line and "--probe" not in line, line
    cfg_file.write_text("probe: {c: abc}\n")  # a union's member is not part of the key
    code, _, err = run_main(monkeypatch, capsys, "train", "--config", cfg_file, "--data", "tiles")
    assert f"{cfg_file}: key 'probe.c': must be val, cv, uni or a number > 0" in one_line_error(err)


def test_flag_names_cover_every_generated_flag():
    names = flag_names(TrainConfig)
    assert names["probe.views"] == "--probe-views" and names["task.control"] == "--text-control"
    assert names["select_groups"] == "--no-select-groups" and len(names) == len(flags_of(TrainConfig))


def test_train_help_parses_without_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom pathotune.cli.main import app\nfrom typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['train', '--help'], env={'COLUMNS': '200'})\n"
        "assert r.exit_code == 0 and '--probe-views' in r.output, r.output\n"
        "print([m for m in ('torch', 'timm') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
