"""Peak memory of a training step: prompt tuning vs full fine-tuning at the same batch, each in its own process.

    python benchmarks/train_memory.py --image-size 224 --batch-size 16

For each configuration a fresh process builds the bundled DINOv2-S, runs a few AdamW steps and reports its peak
resident memory (CPU) or peak CUDA allocation (GPU), and the part of it above the loaded model (activations,
gradients and optimizer state). Ratios are to full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

CONFIGS = {
    "full fine-tuning": ("full", {}),
    "linear probe (end to end)": ("linear", {}),
    "vpt-deep": ("vpt-deep", {}),
    "pathotune": ("pathotune", {}),
    "pathotune + grad checkpointing": ("pathotune", {"grad_checkpointing": True}),
    "pathotune, IVP early": ("pathotune", {"ivp_source": "early", "ivp_layer": 4, "ttp_layer": 4, "tvp_layer": 4}),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(method: str, switches: dict, size: int, batch: int, steps: int) -> dict:
    import torch

    from pathotune import create_model

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    model = (
        create_model(
            "dinov2_vits14",
            method,
            3,
            weights="bundled",
            image_size=size,
            text_features=(torch.randn(384), torch.randn(8, 384)),
            **switches,
        )
        .to(dev)
        .train()
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 3, (batch,), device=dev)
    base = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"peak_mb": peak, "above_model_mb": peak - base, "device": dev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, switches = CONFIGS[args.child]
        print(json.dumps(child(method, switches, args.image_size, args.batch_size, args.steps)))
        return
    rows = {}
    for name in CONFIGS:
        out = (
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    name,
                    "--image-size",
                    str(args.image_size),
                    "--batch-size",
                    str(args.batch_size),
                    "--steps",
                    str(args.steps),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rows[name] = json.loads(out)
    full = rows["full fine-tuning"]
    print(
        f"dinov2_vits14 at {args.image_size} px, batch {args.batch_size}, {args.steps} AdamW steps, "
        f"device {full['device']}"
    )
    print(f"{'config':34s} {'peak MB':>9s} {'above model MB':>15s} {'peak ratio':>11s} {'above-model ratio':>18s}")
    for name, r in rows.items():
        print(
            f"{name:34s} {r['peak_mb']:9.0f} {r['above_model_mb']:15.0f} {r['peak_mb'] / full['peak_mb']:10.2f}x "
            f"{r['above_model_mb'] / full['above_model_mb']:17.2f}x"
        )


if __name__ == "__main__":
    main()
