"""Restoration heatmaps per crop on CPU: the parallel mode against the exact autoregressive one.

The demo's VQ-VAE and PixelSNAIL (flowood_ray/demo.py DemoConfig.vqvae, 64 px crops, 16x16 codes),
untrained: the cost of a map depends on the architecture and on how many codes lie above lambda_p,
not on the weights, and lambda_p is set at the 90th percentile of these crops' own code NLLs, as
calibration sets it on real crops. One torch thread; prints seconds and prior passes per crop.
Usage: python bench/restoration.py [--crops N] [--restorations S] [--skip-autoregressive]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from flowood_ray.demo import DemoConfig
from flowood_ray.models.catalog import build_modules
from flowood_ray.models.glow import preprocess
from flowood_ray.scoring.restoration import RestorationMode, restoration_map
from flowood_ray.scoring.scorers import LAMBDA_P_QUANTILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--restorations", type=int, default=5)
    parser.add_argument("--skip-autoregressive", action="store_true", help="time the parallel mode only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    modules = build_modules("vqvae", DemoConfig().vqvae)
    vqvae, prior = modules["vqvae"].eval(), modules["prior"].eval()
    size = vqvae.config.image_size
    generator = torch.Generator().manual_seed(0)
    crops = preprocess(torch.randint(0, 256, (args.crops, size, size, 3), dtype=torch.uint8, generator=generator),
                       8, "center")
    with torch.no_grad():
        lambda_p = float(prior.nll_map(vqvae.encode(crops)).flatten().quantile(LAMBDA_P_QUANTILE))
    passes = 0

    def count_pass(*_: object) -> None:
        nonlocal passes
        passes += 1

    handle = prior.register_forward_pre_hook(count_pass)
    modes: tuple[RestorationMode, ...] = ("parallel",) if args.skip_autoregressive else ("parallel", "autoregressive")
    print(f"{size} px crops, {prior.config.height}x{prior.config.width} codes, {args.restorations} restorations, "
          f"lambda_p {lambda_p:.2f} nats; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    try:
        restoration_map(vqvae, prior, crops[:1], lambda_p, args.restorations, generator=generator)  # warm-up
        for mode in modes:
            seconds, passes_per_crop = [], []
            for crop in crops.split(1):
                passes = 0
                start = time.perf_counter()
                result = restoration_map(vqvae, prior, crop, lambda_p, args.restorations, generator=generator,
                                         mode=mode)
                seconds.append(time.perf_counter() - start)
                passes_per_crop.append(passes)
            print(f"{mode:>14}: {statistics.median(seconds):8.3f} s per crop (median of {len(seconds)}), "
                  f"{statistics.median(passes_per_crop):5.0f} prior passes, "
                  f"{float(result.resampled_fraction.mean()):.0%} of codes resampled in the last crop")
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
