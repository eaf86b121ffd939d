"""Many tasks on one backbone: a batch mixing 8 tasks in one forward vs a single-task batch, same inputs.

    python benchmarks/multitask_throughput.py --image-size 224 --batch-size 32

Builds 8 PathoTune bundles on the bundled DINOv2-S (different prompts, heads and class counts; untrained, which
does not change the cost), serves one batch whose samples belong to all 8 tasks through MultiTaskModel, and
compares its throughput with the same batch through a single task. Also checks that every sample's logits equal
running its own task alone (max abs difference).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pathotune import Task, create_model, save_bundle
from pathotune.multitask import MultiTaskModel


def timed(fn, repeats: int, n: int) -> list[float]:
    with torch.inference_mode():
        fn()
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            rates.append(n / (time.perf_counter() - t))
    return rates


EARLY = {"ivp_source": "early", "ivp_layer": 4, "ttp_layer": 4, "tvp_layer": 4}


def make_bundles(
    folder: Path, tasks: int, image_size: int, switches: dict, backbone=None, perturb: float = 0.0, start: int = 0
) -> list[Path]:
    """``tasks`` PathoTune bundles on the bundled DINOv2-S in ``folder/task<i>`` (2 to 5 classes each).

    ``backbone`` shares one loaded backbone across the builds; ``perturb`` moves every trained tensor (gates
    included) off its initialisation, so that prompts change the outputs and a task mix-up would show.
    """
    paths = []
    for t in range(start, start + tasks):
        classes = tuple(f"class{j}" for j in range(2 + t % 4))
        model = create_model(
            "dinov2_vits14",
            "pathotune",
            len(classes),
            task=Task(name=f"task {t}", classes=classes),
            weights="bundled",
            image_size=image_size,
            text_features=(torch.randn(384), torch.randn(8, 384)),
            backbone_module=backbone,
            **switches,
        )
        if perturb:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn_like(p) * perturb)
        paths.append(save_bundle(model, folder / f"task{t}"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ivp-source", default="early", choices=["early", "backbone"])
    args = ap.parse_args()
    torch.manual_seed(0)
    switches = EARLY if args.ivp_source == "early" else {}
    with tempfile.TemporaryDirectory() as tmp:
        multi = MultiTaskModel.from_bundles(make_bundles(Path(tmp), args.tasks, args.image_size, switches))
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    mixed_ids = torch.arange(args.batch_size) % args.tasks
    single_ids = torch.zeros(args.batch_size, dtype=torch.long)
    plain = timed(lambda: multi.backbone(x), args.repeats, args.batch_size)
    single = timed(lambda: multi(x, single_ids), args.repeats, args.batch_size)
    mixed = timed(lambda: multi(x, mixed_ids), args.repeats, args.batch_size)
    with torch.inference_mode():
        out = multi(x, mixed_ids)
        diff = max((out[i] - multi.tasks[int(t)](x[i : i + 1])[0]).abs().max().item() for i, t in enumerate(mixed_ids))
    med = statistics.median
    print(
        f"dinov2_vits14 at {args.image_size} px, batch {args.batch_size}, {args.tasks} tasks, "
        f"IVP {args.ivp_source}, {torch.get_num_threads()} threads"
    )
    for name, r in (("plain backbone", plain), ("single-task batch", single), ("mixed 8-task batch", mixed)):
        print(f"{name:22s} {med(r):8.2f} img/s [{min(r):.2f}, {max(r):.2f}]")
    print(f"mixed / single-task throughput: {med(mixed) / med(single):.3f}x (target >= 0.90)")
    print(f"max |mixed - each task alone|: {diff:.2e} (target <= 1e-5)")


if __name__ == "__main__":
    main()
