"""Shareable bundles, peft-style: save_pretrained / from_pretrained (a folder or a Hub repo) / push_to_hub write and
read the one bundle format plus a model card; round trips are exact; pushing is tested against a mocked HfApi."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, TINY2, TINY_NAME, one_line_error, run_main
from safetensors.torch import load_file, save_file
from test_hub import cache_repo, hub_cache  # noqa: F401  (hub_cache is a fixture)

from pathotune import BundleError, PathoTuneModel, Task, create_model
from pathotune.bundle import CARD, MANIFEST, TENSORS, bundle_card, push_bundle, resolve_bundle

FORMAT1 = Path(__file__).parent / "data" / "format1_bundles"
CLASSES = ("background", "pen", "tissue")


@pytest.fixture
def model(tmp_path, text_features) -> PathoTuneModel:
    """A tiny prompt-tuned model on a local checkpoint, its trainable tensors moved off their init."""
    torch.manual_seed(1)
    weights = tmp_path / "backbone.safetensors"
    base = create_model(TINY_NAME, "linear", 2, image_size=32, backbone_kwargs=TINY)
    save_file({k: v.contiguous() for k, v in base.backbone.vit.state_dict().items()}, str(weights))
    torch.manual_seed(0)
    task = Task(name="pen-mark QC", organ="skin", classes=CLASSES)
    m = create_model(
        TINY_NAME,
        "pathotune",
        3,
        task=task,
        weights=weights,
        image_size=32,
        backbone_kwargs=TINY,
        text_features=text_features,
    )
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_save_and_load_pretrained_round_trip_exactly(model, tmp_path, images):
    out = model.save_pretrained(tmp_path / "shared", metrics={"accuracy": 0.875}, command="pathotune train ...")
    assert sorted(p.name for p in out.iterdir()) == [CARD, MANIFEST, TENSORS]
    loaded = PathoTuneModel.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    stored = load_file(str(out / TENSORS))
    assert not any(k.startswith("backbone.") for k in stored)  # only prompts, head and their buffers
    assert "head.weight" in stored and any(k.startswith("ttp.") for k in stored)
    assert sum(v.numel() for v in stored.values()) < sum(p.numel() for p in model.backbone.parameters())
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        model.save_pretrained(out)
    assert model.save_pretrained(out, overwrite=True) == out


def test_the_model_card_describes_the_bundle(model, tmp_path):
    out = model.save_pretrained(
        tmp_path / "shared", metrics={"accuracy": 0.875, "auroc": 0.9}, command="pathotune train --x"
    )
    card = (out / CARD).read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "pathotune" and "pathology" in meta["tags"]
    assert "base_model" not in meta  # a local checkpoint of an unregistered timm model: no Hub id to name
    for text in (*CLASSES, model.provenance.fingerprint, "pathotune", TINY_NAME, "| accuracy | 0.8750 |"):
        assert text in card
    assert "```bash\npathotune train --x\n```" in card
    assert "pen-mark QC" in card and model.task.render() in card


def test_hub_weights_become_the_cards_base_model(model, tmp_path):
    manifest = json.loads((model.save_pretrained(tmp_path / "b") / MANIFEST).read_text())
    manifest["provenance"]["weights"] = "hf-hub:MahmoodLab/UNI@main:pytorch_model.bin"
    card = bundle_card(manifest, repo_id="me/pen-qc")
    assert front_matter(card)["base_model"] == "MahmoodLab/UNI"
    assert (
        'from_pretrained("me/pen-qc")\n' in card and "weights: `hf-hub:MahmoodLab/UNI@main:pytorch_model.bin`" in card
    )
    assert "pathotune predict hf-hub:me/pen-qc images/" in card


def test_from_pretrained_reads_a_hub_repo_through_the_cache(model, tmp_path, images, hub_cache):  # noqa: F811
    out = model.save_pretrained(tmp_path / "shared")
    cache_repo(hub_cache, "me/pen-qc", {n: out / n for n in (MANIFEST, TENSORS, CARD)})
    with torch.no_grad():
        want = model(images)
        for source in ("me/pen-qc", "hf-hub:me/pen-qc", "hf-hub:me/pen-qc@main"):
            assert torch.equal(PathoTuneModel.from_pretrained(source)(images), want)
    assert resolve_bundle("hf-hub:me/pen-qc").parent.name == "snapshots"


def test_an_uncached_hub_bundle_offline_is_one_line(hub_cache, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError) as e:
        PathoTuneModel.from_pretrained("me/absent")
    msg = str(e.value)
    assert "\n" not in msg and "me/absent" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "pass a local bundle folder (there is no folder me/absent here)" in msg
    with pytest.raises(BundleError, match="names a file; a bundle is a whole repo"):
        resolve_bundle("hf-hub:me/absent:manifest.json")
    with pytest.raises(BundleError, match=r"bundle nowhere not found"):
        PathoTuneModel.from_pretrained("nowhere")


@pytest.mark.parametrize("name", ["pathotune_attn", "instance_mlp"])
def test_format_1_bundles_load_through_from_pretrained(name):
    model = PathoTuneModel.from_pretrained(FORMAT1 / name)
    ref = load_file(str(FORMAT1 / name / "reference.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(ref["images"]), ref["logits"], atol=1e-5, rtol=1e-5)


class FakeApi:
    """HfApi's create_repo/upload_folder, recording what would have been sent (the folder's files at upload)."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok, repo_type, self.token))

    def create_branch(self, repo_id, branch, exist_ok=False, repo_type=None):
        FakeApi.calls.append(("create_branch", repo_id, branch, exist_ok, repo_type))

    def upload_folder(self, repo_id, folder_path, commit_message, repo_type=None, revision=None, create_pr=None):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeApi.calls.append(("upload_folder", repo_id, commit_message, files, revision, create_pr))

        class Info:
            commit_url = f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"
            pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if create_pr else None

        return Info()


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr("pathotune.hub.HfApi", FakeApi)
    monkeypatch.setattr("pathotune.hub.hf_constants.HF_HUB_OFFLINE", False)
    return FakeApi


def test_push_to_hub_uploads_the_bundle_and_card(model, tmp_path, images, fake_api):
    url = model.push_to_hub("me/pen-qc", private=True, token="hf_x", metrics={"accuracy": 0.5})
    assert url == f"https://huggingface.co/me/pen-qc/commit/{'0' * 40}"
    (create, repo, private, exist_ok, kind, token), upload = fake_api.calls
    assert (create, repo, private, exist_ok, kind, token) == ("create_repo", "me/pen-qc", True, True, "model", "hf_x")
    files = upload[3]
    assert sorted(files) == [CARD, MANIFEST, TENSORS]
    card = files[CARD].decode()
    assert 'from_pretrained("me/pen-qc"' in card and "| accuracy | 0.5000 |" in card
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, data in files.items():
        (pulled / name).write_bytes(data)
    with torch.no_grad():
        assert torch.equal(PathoTuneModel.from_pretrained(pulled)(images), model(images))


def test_pushing_a_run_folder_takes_its_metrics_and_config(model, tmp_path, fake_api):
    run = tmp_path / "run"
    model.save_pretrained(run / "bundle", metrics={"accuracy": 0.75, "macro_f1": 0.7})
    (run / "metrics.json").write_text(
        json.dumps({"accuracy": 0.75, "macro_f1": 0.7, "train_seconds": 3.0, "ci": {"accuracy": [0.6, 0.9]}})
    )
    (run / "config.yaml").write_text("backbone: vit_small_patch16_224\nmethod: pathotune\n")
    push_bundle(run, "me/run")
    files = fake_api.calls[-1][3]
    assert sorted(files) == ["README.md", "config.yaml", "manifest.json", "metrics.json", "prompts.safetensors"]
    card = files[CARD].decode()
    assert "| accuracy | 0.7500 | 0.6000–0.9000 |" in card and "| macro_f1 | 0.7000 | – |" in card
    assert "train_seconds" not in card
    assert "pathotune train --config config.yaml" in card
    (result,) = front_matter(card)["model-index"][0]["results"][:1]
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == 0.75
    assert result["metrics"][0]["args"]["ci95"] == [0.6, 0.9]


def test_a_resave_keeps_every_metric_and_the_card_its_evidence(model, tmp_path):
    """Loading a bundle and saving it again keeps its metrics, intervals, split and recipe; new metrics replace
    them all (the old intervals described the old numbers)."""
    extra = {
        "metrics": {"balanced_accuracy": 0.81, "auroc": 0.93},
        "intervals": {"balanced_accuracy": [0.73, 0.88], "auroc": [0.87, 0.96]},
        "evaluation": {"split": "test", "n": 220, "ci_unit": "group", "ci_units": 12},
        "training": {"method": "pathotune", "lr": 0.001, "steps": 200},
        "command": "pathotune train --config config.yaml",
    }
    from pathotune.bundle import save_bundle

    first = save_bundle(model, tmp_path / "first", extra=extra)
    again = PathoTuneModel.from_pretrained(first).save_pretrained(tmp_path / "again")
    assert json.loads((again / MANIFEST).read_text())["extra"] == extra
    card = (again / CARD).read_text()
    assert "| balanced_accuracy | 0.8100 | 0.7300–0.8800 |" in card
    assert "split: test, n = 220 images" in card and "bootstrap over 12 groups" in card
    assert "- lr: 0.0010" in card and "- steps: 200" in card
    meta = front_matter(card)
    (metric, auroc) = meta["model-index"][0]["results"][0]["metrics"]
    assert metric["value"] == 0.81 and metric["args"] == {"ci95": [0.73, 0.88], "ci_unit": "group"}
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "test"
    for section in ("## Intended use", "## Limitations", "## Licence", "## Citation", "Lu, Jiaxuan"):
        assert section in card
    replaced = PathoTuneModel.from_pretrained(first).save_pretrained(tmp_path / "new", metrics={"accuracy": 0.5})
    kept = json.loads((replaced / MANIFEST).read_text())["extra"]
    assert kept["metrics"] == {"accuracy": 0.5} and "intervals" not in kept and "evaluation" not in kept
    assert kept["training"] == extra["training"]


def test_the_card_carries_the_base_models_licence(model, tmp_path):
    manifest = json.loads((model.save_pretrained(tmp_path / "b") / MANIFEST).read_text())
    for backbone, licence in (("uni", "cc-by-nc-nd-4.0"), ("dinov2_vits14", "apache-2.0"), ("phikon", "other")):
        manifest["provenance"]["backbone"] = backbone
        meta = front_matter(bundle_card(manifest))
        assert meta["license"] == licence
        if licence == "other":
            assert meta["license_name"] == "owkin-non-commercial" and meta["license_link"].startswith("https://")
    manifest["provenance"]["backbone"] = "pathoduet"  # no licence recorded: the card says so, the Hub sees none
    card = bundle_card(manifest)
    assert "license" not in front_matter(card) and "not recorded for this backbone" in card


def test_pushing_refuses_a_corrupt_bundle_or_offline(model, tmp_path, fake_api, monkeypatch):
    out = model.save_pretrained(tmp_path / "b")
    monkeypatch.setattr("pathotune.hub.hf_constants.HF_HUB_OFFLINE", True)
    with pytest.raises(BundleError, match="cannot push to Hugging Face repo me/x: HF_HUB_OFFLINE is set"):
        push_bundle(out, "me/x")
    monkeypatch.setattr("pathotune.hub.hf_constants.HF_HUB_OFFLINE", False)
    with pytest.raises(BundleError, match="'hf-hub:not a repo' is not a Hugging Face reference"):
        push_bundle(out, "not a repo")
    with open(out / TENSORS, "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="is corrupt"):
        push_bundle(out, "me/x")
    assert fake_api.calls == []


def test_cli_push_and_info_on_a_hub_bundle(model, tmp_path, fake_api, hub_cache, monkeypatch, capsys):  # noqa: F811
    out = model.save_pretrained(tmp_path / "b")
    monkeypatch.setattr("pathotune.hub.hf_constants.HF_HUB_OFFLINE", False)
    code, stdout, err = run_main(monkeypatch, capsys, "push", out, "--repo", "me/pen-qc", "--private")
    assert code == 0, err
    assert "pushed to https://huggingface.co/me/pen-qc/commit/" in stdout
    assert fake_api.calls[0][:3] == ("create_repo", "me/pen-qc", True)
    cache_repo(hub_cache, "me/pen-qc", {n: out / n for n in (MANIFEST, TENSORS)})
    monkeypatch.setattr("pathotune.hub.hf_constants.HF_HUB_OFFLINE", True)
    code, stdout, err = run_main(monkeypatch, capsys, "info", "hf-hub:me/pen-qc")
    assert code == 0, err
    assert model.provenance.fingerprint in stdout
    code, _, err = run_main(monkeypatch, capsys, "push", out, "--repo", "me/pen-qc")
    assert code == 2
    assert "HF_HUB_OFFLINE is set; unset it and retry" in one_line_error(err)


def test_push_to_a_branch_or_as_a_pull_request(model, fake_api):
    model.push_to_hub("me/pen-qc", revision="v2")
    assert fake_api.calls[1] == ("create_branch", "me/pen-qc", "v2", True, "model")
    assert fake_api.calls[2][4:] == ("v2", False)
    url = model.push_to_hub("me/pen-qc", create_pr=True)
    assert url == "https://huggingface.co/me/pen-qc/discussions/1" and fake_api.calls[-1][4:] == (None, True)


def test_a_push_without_network_says_network_unreachable(model, fake_api, monkeypatch):
    import httpx

    def no_route(self, *args, **kwargs):
        try:
            raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
        except httpx.ConnectError as e:
            raise RuntimeError("Hub request failed") from e

    monkeypatch.setattr(FakeApi, "create_repo", no_route)
    with pytest.raises(BundleError, match="network unreachable .*check the connection") as exc:
        model.push_to_hub("me/pen-qc")
    assert "log in" not in str(exc.value)


def test_save_pretrained_works_whatever_was_imported_first(tmp_path):
    """A script that imports only pathotune.model can still save and load the bundle format."""
    import subprocess
    import sys

    code = (
        "from pathotune.model import create_model, PathoTuneModel\n"
        f"m = create_model('vit_small_patch16_224', 'vpt-deep', 3, image_size=32, backbone_kwargs={TINY2!r})\n"
        f"m.save_pretrained({str(tmp_path / 'b')!r})\n"
        f"print(type(PathoTuneModel.from_pretrained({str(tmp_path / 'b')!r})).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("PathoTuneModel")
