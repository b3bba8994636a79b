"""`python -m fused_res demo`: build a reference model, run it, print a short report."""

from __future__ import annotations

import time

import torch

from . import models
from .bench.roofline import flops_per_image


def run_demo(model_name: str = "resnet50", batch: int | None = None, device: str | None = None,
             repeats: int = 3) -> dict:
    """Build `model_name`, run eval forward passes on random input, return and print a report."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    image = 32 if model_name in models.CIFAR_MODELS else 224
    batch = batch or (64 if device == "cuda" else 2)
    torch.manual_seed(0)
    model = models.get_model(model_name).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    gflops = flops_per_image(model, image) / 1e9
    x = torch.randn(batch, 3, image, image, device=device)
    with torch.no_grad():
        y = model(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            y = model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / repeats
    report = {
        "model": model_name, "device": device, "batch": batch, "image_size": image,
        "params_M": n_params / 1e6, "gflops_per_image": gflops, "output_shape": list(y.shape),
        "output_finite": bool(torch.isfinite(y).all()), "seconds_per_batch": dt,
        "images_per_second": batch / dt,
    }
    dev_label = "CPU" if device == "cpu" else torch.cuda.get_device_name()
    print(f"fused_res demo: {model_name} (reference, eval, fp32) on {dev_label}")
    print(f"  parameters      {report['params_M']:.2f} M")
    print(f"  forward FLOPs   {gflops:.2f} GFLOP / image at {image}x{image}")
    print(f"  output          {tuple(y.shape)}, finite: {report['output_finite']}")
    print(f"  time            {dt * 1e3:.1f} ms / batch of {batch} "
          f"({report['images_per_second']:.1f} img/s, {dev_label} numbers)")
    return report
