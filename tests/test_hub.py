"""Backbone weights from the Hugging Face Hub, opt-in (``--weights hf-hub:owner/repo[@rev][:file]``), read through
HF's cache: tested against a local fake hub (a pre-populated cache folder, HF_HUB_OFFLINE set), never the network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY2, TINY_CONFIG, TINY_NAME, one_line_error, run_main, write_config, write_dataset
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import save_file

from pathotune import ConfigError, PathoTuneModel, WeightsError, create_model
from pathotune.backbones import get_backbone_spec, registry, resolve_weights
from pathotune.backbones.loading import read_state_dict
from pathotune.bundle import MANIFEST
from pathotune.hub import HubRef, parse_hub_ref

COMMIT = "0123456789abcdef0123456789abcdef01234567"
KW = {"image_size": 32, "backbone_kwargs": TINY2}  # the tiny backbone of TINY_CONFIG


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache that huggingface_hub uses, offline: the fake hub holds what a test caches into it."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Put ``files`` (name in the repo -> local file) into the cache as huggingface_hub lays out a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for name, src in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, snapshot / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def http_error(cls: type[Exception], message: str) -> Exception:
    """A huggingface_hub HTTP error without an HTTP response (its constructor wants one; the message is enough)."""
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    return e


def tiny_state(seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = create_model(TINY_NAME, "linear", 2, image_size=32, backbone_kwargs=TINY2)
    return {k: v.contiguous() for k, v in model.backbone.vit.state_dict().items()}


@pytest.fixture
def tiny_files(tmp_path) -> dict[str, Path]:
    """The same tiny backbone as safetensors and as a torch .bin (read with weights_only)."""
    state = tiny_state()
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.bin"
    save_file(state, str(st))
    torch.save(state, pt)
    return {"safetensors": st, "bin": pt}


# References ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("hf-hub:MahmoodLab/UNI", HubRef("MahmoodLab/UNI")),
        ("hf-hub:owkin/phikon:model.safetensors", HubRef("owkin/phikon", "model.safetensors")),
        ("hf-hub:me/x@v1.0:sub/w.bin", HubRef("me/x", "sub/w.bin", "v1.0")),
    ],
)
def test_references_parse_and_print_back(text, ref):
    assert parse_hub_ref(text, ConfigError) == ref
    assert str(ref) == text


@pytest.mark.parametrize(
    "text", ["hf-hub:", "hf-hub:UNI", "hf-hub:a/b:", "hf-hub:a/b@:f", "hf-hub:a/b:../x", "hf-hub:a/../b"]
)
def test_malformed_references_fail_on_one_line(text):
    with pytest.raises(ConfigError, match="write hf-hub:owner/repo") as e:
        resolve_weights(TINY_NAME, text)
    assert "\n" not in str(e.value) and text in str(e.value)


# Downloads through the cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_weights_come_from_the_hf_cache(hub_cache, tiny_files, kind):
    name = "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
    cache_repo(hub_cache, "me/tiny", {name: tiny_files[kind]})
    expected = tiny_state()
    for ref in (f"hf-hub:me/tiny:{name}", "hf-hub:me/tiny", f"hf-hub:me/tiny@{COMMIT}"):
        sd = read_state_dict(ref)  # without a file name: the usual names, safetensors first
        assert sd.keys() == expected.keys()
        assert all(torch.equal(sd[k], expected[k]) for k in sd)


def test_bin_files_are_read_without_unpickling_code(hub_cache, tmp_path):
    evil = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "x": Path("/")}, evil)  # an arbitrary object: weights_only refuses it
    cache_repo(hub_cache, "bad/actor", {"pytorch_model.bin": evil})
    with pytest.raises(WeightsError, match="cannot read weights file .*pytorch_model.bin") as e:
        read_state_dict("hf-hub:bad/actor")
    assert "\n" not in str(e.value)


def test_a_model_on_hub_weights_equals_the_local_file_and_records_the_reference(hub_cache, tiny_files):
    cache_repo(hub_cache, "me/tiny", {"model.safetensors": tiny_files["safetensors"]})
    hub = create_model(TINY_NAME, "linear", 2, weights="hf-hub:me/tiny", **KW)
    local = create_model(TINY_NAME, "linear", 2, weights=tiny_files["safetensors"], **KW)
    assert hub.provenance.fingerprint == local.provenance.fingerprint
    assert hub.provenance.weights == "hf-hub:me/tiny"


def test_offline_and_uncached_is_one_line_naming_the_repo(hub_cache):
    uni = get_backbone_spec("uni")
    with pytest.raises(WeightsError) as e:
        read_state_dict("hf-hub:MahmoodLab/UNI:pytorch_model.bin", uni)
    msg = str(e.value)
    assert "\n" not in msg
    assert "MahmoodLab/UNI" in msg and "pytorch_model.bin" in msg and str(hub_cache) in msg
    assert "HF_HUB_OFFLINE is set" in msg and "network access" in msg and "local file" in msg


def test_a_repo_without_any_usual_file_names_them(hub_cache, tiny_files, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def missing(repo_id, filename, revision=None):
        raise http_error(RemoteEntryNotFoundError, "404 Entry not found")

    monkeypatch.setattr("pathotune.hub.hf_hub_download", missing)
    with pytest.raises(WeightsError, match=r"me/empty has none of model.safetensors, .*hf-hub:me/empty:<filename>"):
        read_state_dict("hf-hub:me/empty")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (GatedRepoError, "is gated: accept its terms at https://huggingface.co/MahmoodLab/UNI and log in"),
        (RepositoryNotFoundError, "MahmoodLab/UNI not found (or private"),
        (ConnectionError, "cannot fetch weights from Hugging Face repo MahmoodLab/UNI: no route;"),
    ],
)
def test_hub_failures_are_one_line(hub_cache, monkeypatch, error, expected):
    def fail(repo_id, filename, revision=None):
        raise http_error(error, "401 Client Error") if issubclass(error, RepositoryNotFoundError) else error("no route")

    monkeypatch.setattr("pathotune.hub.hf_hub_download", fail)
    with pytest.raises(WeightsError) as e:
        read_state_dict("hf-hub:MahmoodLab/UNI")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith("pass --weights with a local file")


# Resolution: local files stay the default ---------------------------------------------------------------------------


def test_named_models_ask_for_local_weights_or_a_hub_reference():
    with pytest.raises(ConfigError, match="needs --weights: pytorch_model.bin from the MahmoodLab/UNI") as e:
        resolve_weights("uni", None)
    assert "hf-hub:" in str(e.value)
    with pytest.raises(WeightsError, match="weights file .*nowhere.bin not found"):
        read_state_dict("nowhere.bin", get_backbone_spec("uni"))


def test_bare_hf_hub_uses_the_specs_own_repo(hub_cache, tiny_files, monkeypatch):
    spec = registry.BackboneSpec(
        name="tiny_hub", timm_name=TINY_NAME, family="pathology", hub_repo="lab/tiny", hub_file="tile.bin"
    )
    monkeypatch.setitem(registry._REGISTRY, "tiny_hub", spec)
    assert resolve_weights("tiny_hub", "hf-hub") == "hf-hub:lab/tiny:tile.bin"
    with pytest.raises(ConfigError, match="or --weights hf-hub:lab/tiny to download it"):
        resolve_weights("tiny_hub", None)
    cache_repo(hub_cache, "lab/tiny", {"tile.bin": tiny_files["bin"]})
    sd = read_state_dict("hf-hub:lab/tiny", spec)  # the spec names the repo's file
    assert sd.keys() == tiny_state().keys()
    with pytest.raises(ConfigError, match="backbone 'vit_small_patch16_224' has no registered Hugging Face repo"):
        resolve_weights(TINY_NAME, "hf-hub")


# The command line ---------------------------------------------------------------------------------------------------


def test_cli_trains_on_hub_weights_and_fails_offline_uncached(hub_cache, tiny_files, tmp_path, monkeypatch, capsys):
    data = write_dataset(tmp_path / "tiles", {"train": 4, "val": 2})
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0, augment="none", accelerator="cpu")
    assert TINY_CONFIG["backbone"] == TINY_NAME
    cache_repo(hub_cache, "me/tiny", {"pytorch_model.bin": tiny_files["bin"]})
    args = ["train", "--data", data, "--config", cfg, "--method", "linear", "--steps", "1", "--quiet"]
    code, _, err = run_main(monkeypatch, capsys, *args, "--weights", "hf-hub:me/tiny", "--out", tmp_path / "run")
    assert code == 0, err
    manifest = (tmp_path / "run" / "bundle" / MANIFEST).read_text()
    assert '"weights": "hf-hub:me/tiny"' in manifest
    reloaded = PathoTuneModel.from_pretrained(tmp_path / "run")  # the bundle names its weights: the cache has them
    assert (
        reloaded.provenance.fingerprint
        == create_model(TINY_NAME, weights=tiny_files["bin"], **KW).provenance.fingerprint
    )

    code, _, err = run_main(monkeypatch, capsys, *args, "--weights", "hf-hub:me/absent", "--out", tmp_path / "run2")
    assert code == 2
    line = one_line_error(err)
    assert "me/absent" in line and "HF_HUB_OFFLINE is set" in line and "pass --weights with a local file" in line
