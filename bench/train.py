"""Training throughput of each model family at 1 and 2 DDP workers on CPU, side by side.

Samples/s come from the training loop itself (rank 0, last epoch, all workers' samples), so
worker start-up is not counted. Usage: python bench/train.py [--workdir bench_out/train]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import synthetic_crops  # noqa: E402

from flowood_ray.cluster.train import TrainConfig, fit  # noqa: E402
from flowood_ray.registry import configure  # noqa: E402

MODELS = {
    "glow": {"glow": {"image_size": 64, "levels": 3, "steps_per_level": 4, "hidden_channels": 64}},
    "vqvae": {"vqvae": {"image_size": 64, "hidden_channels": 64, "res_channels": 32, "n_res_blocks": 1,
                        "codebook_size": 128, "code_dim": 32},
              "prior": {"channels": 64, "n_blocks": 2, "n_res_blocks": 1, "key_channels": 32, "n_heads": 2}},
    # A sample is a clip of 8 crops here.
    "clip": {"encoder": {"image_size": 64, "clip_frames": 8, "encoder": {"widths": [16, 32, 64], "embed_dim": 32}},
             "flow": {"n_layers": 6, "hidden": 64, "bottleneck": 16}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/train"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--family", action="append", choices=sorted(MODELS), help="repeatable (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    families = args.family or list(MODELS)
    crops = synthetic_crops(args.workdir)
    ray.shutdown()  # preprocessing started its own Ray; each measurement starts a fresh one
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = configure(f"sqlite:///{tmp}/mlflow.db")
        import mlflow

        run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("bench").experiment_id).info.run_id
        for family in families:
            for workers in (1, 2):
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                try:
                    train = TrainConfig(family=family, epochs=args.epochs, batch_size=32, workers=workers)
                    _, metrics = fit(crops, train, MODELS[family], f"bench-{family}-{workers}", Path(tmp) / "rr",
                                     uri, run_id)
                finally:
                    ray.shutdown()
                results[(family, workers)] = metrics["train_samples_per_s"]
    print(f"{'family':<8} {'1 worker':>12} {'2 workers':>12} {'ratio':>7}   (samples/s of the last phase)")
    for family in families:
        one, two = results[(family, 1)], results[(family, 2)]
        print(f"{family:<8} {one:12.1f} {two:12.1f} {two / one:7.2f}")


if __name__ == "__main__":
    main()
