"""Train a detector family with Ray Train and register it in MLflow.

  ray job submit --working-dir . -- python jobs/train.py --family glow --data CROPS_DIR --epochs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from flowood_ray.cluster.train import TrainConfig
from flowood_ray.cluster.train_job import train_and_register
from flowood_ray.media.facecrop import ModelInput
from flowood_ray.models.catalog import FAMILIES


def main(argv: list[str] | None = None, family: str | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if family is None:
        parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--data", type=Path, required=True, help="face-crop shards from `flowood preprocess`")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per training phase")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2, help="DDP workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--face-fraction", type=float, default=1.0, help="central part of each crop the model sees")
    parser.add_argument("--highpass", action="store_true", help="model the high-frequency residual of the crops")
    parser.add_argument("--fake-methods", nargs="+", metavar="METHOD",
                        help="supervised families only: learn from these methods' fakes (default: all); "
                        "leave one out to measure how the detector meets an unseen method")
    parser.add_argument("--model-config", type=json.loads, default={}, help='JSON, e.g. {"glow": {"levels": 3}}')
    parser.add_argument("--run-name", help="reuse a name to resume a killed run (default: FAMILY-DATA)")
    parser.add_argument("--storage", type=Path, default=Path("ray_results"), help="checkpoints (shared storage)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)
    family = family or args.family
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train = TrainConfig(
        family=family, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, workers=args.workers,
        use_gpu=args.gpu, seed=args.seed, input=ModelInput(face_fraction=args.face_fraction, highpass=args.highpass),
        fake_methods=args.fake_methods,
    )
    summary = train_and_register(
        args.data, train, args.model_config, args.run_name or f"{family}-{args.data.resolve().name}",
        args.storage, args.tracking_uri, args.address,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "calibration"}, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
