"""Prompted inference vs the plain frozen backbone forward, measured in one run on the same inputs.

    python benchmarks/prompt_overhead.py --backbone dinov2_vits14 --image-size 224 --batch-size 32

Prints throughput for each configuration (median and spread over repeats, after a warm-up) and its ratio to
the plain forward. Weights are the bundled ones when the backbone has them. By default the process keeps freed
memory for reuse, as the `pathotune` CLI does (`--allocator system` measures glibc's defaults instead).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pathotune import create_model
from pathotune.backbones import get_backbone_spec
from pathotune.core.allocator import allocator_note, retain_freed_memory

CONFIGS = {
    "plain backbone": ("linear", {}),
    "vpt-deep (10 tokens x 12 layers)": ("vpt-deep", {}),
    "vpt-deep, joint softmax (VPT as published)": ("vpt-deep", {"prompt_attn": "joint"}),
    "pathotune (default preset)": ("pathotune", {}),
    "pathotune, IVP second pass": ("pathotune", {"ivp_source": "backbone", "ivp_layer": 0}),
    "pathotune, IVP from cache (seen images)": (
        "pathotune",
        {"ivp_source": "backbone", "ivp_layer": 0, "ivp_cache": 4096},
    ),
}


def throughputs(models: dict, x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Round-robin over configurations, so load from anything else on the machine hits all of them alike."""
    rates: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # warm-up (and, for the cache configuration, the first sight of these images)
        for _ in range(repeats):
            for name, model in models.items():
                t = time.perf_counter()
                model(x)
                rates[name].append(x.shape[0] / (time.perf_counter() - t))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--allocator", choices=("retain", "system"), default="retain", help="as the CLI runs, or not")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.allocator == "retain":
        retain_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = "bundled" if get_backbone_spec(args.backbone).bundled else None
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    text = (torch.randn(384), torch.randn(16, 384))
    models = {
        name: create_model(
            args.backbone, method, 3, weights=weights, image_size=args.image_size, text_features=text, **switches
        ).eval()
        for name, (method, switches) in CONFIGS.items()
    }
    rates = throughputs(models, x, args.repeats)
    base = statistics.median(rates["plain backbone"])
    rows = [
        {
            "config": n,
            "img_per_s": statistics.median(r),
            "min": min(r),
            "max": max(r),
            "ratio": statistics.median(r) / base,
        }
        for n, r in rates.items()
    ]
    print(
        f"{args.backbone} at {args.image_size} px, batch {args.batch_size}, {args.threads} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, allocator: {allocator_note()}"
    )
    print(f"{'config':40s} {'img/s (median)':>15s} {'[min, max]':>16s} {'vs plain':>9s}")
    for r in rows:
        print(f"{r['config']:40s} {r['img_per_s']:15.2f} [{r['min']:6.2f}, {r['max']:6.2f}] {r['ratio']:8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "allocator": allocator_note(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
