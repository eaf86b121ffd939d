"""Many tasks on one backbone: one mixed batch gives each task's own outputs."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, TINY_NAME
from safetensors.torch import save_file

from pathotune import BundleError, Task, create_model, load_bundle, save_bundle
from pathotune.multitask import MultiTaskModel, forward_mixed

NAME = TINY_NAME


def make_bundles(tmp_path, text_features, specs):
    paths = []
    for i, (method, n_classes, switches) in enumerate(specs):
        torch.manual_seed(10 + i)
        task = Task(name=f"task{i}", classes=tuple(f"c{j}" for j in range(n_classes)))
        model = create_model(
            NAME,
            method,
            n_classes,
            task=task,
            image_size=32,
            backbone_kwargs=TINY,
            text_features=text_features,
            **switches,
        )
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        paths.append(save_bundle(model, tmp_path / f"b{i}"))
    return paths


@pytest.mark.parametrize("early", [False, True])
def test_mixed_batch_equals_each_task_alone(tmp_path, text_features, early):
    ivp = {"ivp_source": "early", "ivp_layer": 1, "ttp_layer": 1, "tvp_layer": 1} if early else {}
    specs = [
        ("pathotune", 3, ivp),
        ("pathotune", 2, ivp),
        ("pathotune", 4, ivp),
        ("vpt-deep", 2, {}),  # another layout: its own forward inside the same call
        ("linear", 3, {}),
    ]
    paths = make_bundles(tmp_path, text_features, specs)
    multi = MultiTaskModel.from_bundles(paths)
    assert len(multi.layout_groups) == 3
    assert all(t.backbone is multi.backbone for t in multi.tasks)
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    task_ids = torch.tensor([0, 1, 2, 3, 4, 2, 1, 0, 3, 4])
    with torch.no_grad():
        mixed = multi(x, task_ids)
        for i, t in enumerate(task_ids.tolist()):
            alone = multi.tasks[t](x[i : i + 1])[0]
            assert mixed[i].shape == (specs[t][1],)
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)


def test_refuses_other_backbone_weights(tmp_path, text_features):
    a, b = make_bundles(tmp_path, text_features, [("vpt-deep", 2, {}), ("vpt-deep", 2, {})])
    torch.manual_seed(3)
    other = create_model(NAME, "linear", 2, image_size=32, backbone_kwargs=TINY)
    w = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() + 1.0 for k, v in other.backbone.vit.state_dict().items()}, str(w))
    model_b = create_model(NAME, "vpt-deep", 2, weights=w, image_size=32, backbone_kwargs=TINY)
    with pytest.raises(BundleError, match="share backbone weights"):
        MultiTaskModel([load_bundle(a), model_b])
    full = create_model(NAME, "full", 2, image_size=32, backbone_kwargs=TINY)
    with pytest.raises(BundleError, match="changes the backbone"):
        MultiTaskModel([load_bundle(a), full])


def test_forward_mixed_runs_any_subset_of_loaded_tasks(tmp_path, text_features):
    ivp = {"ivp_source": "early", "ivp_layer": 1, "ttp_layer": 1, "tvp_layer": 1}
    paths = make_bundles(tmp_path, text_features, [("pathotune", 3, ivp), ("vpt-deep", 2, {}), ("pathotune", 4, ivp)])
    multi = MultiTaskModel.from_bundles(paths)
    subset = [multi.tasks[2], multi.tasks[0]]  # a serving cache passes whichever tasks a batch holds
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        out = forward_mixed(subset, x, ids)
        for i, t in enumerate(ids.tolist()):
            torch.testing.assert_close(out[i], subset[t](x[i : i + 1])[0], atol=1e-5, rtol=0)
    alone = load_bundle(paths[1])  # its own backbone instance
    with pytest.raises(BundleError, match="one backbone instance"):
        forward_mixed([multi.tasks[0], alone], x, ids)


def test_refuses_bundles_that_pool_another_way(tmp_path, text_features):
    a, b = make_bundles(tmp_path, text_features, [("vpt-deep", 2, {}), ("vpt-deep", 2, {"pool": "avg"})])
    with pytest.raises(BundleError, match=r"default pooling\) and .*avg pooling\)"):
        MultiTaskModel.from_bundles([a, b])
    with pytest.raises(BundleError, match="share backbone weights, image size and pooling"):
        MultiTaskModel([load_bundle(a), load_bundle(b)])
