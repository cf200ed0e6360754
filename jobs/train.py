"""Train a detector family with Ray Train and register it in MLflow: a wrapper of `flowood train`.

  ray job submit --working-dir . -- python jobs/train.py glow --data CROPS_DIR --epochs 2
"""

from __future__ import annotations

import sys

from flowood_ray.cli import app


def main(argv: list[str], family: str | None = None) -> None:
    app(["train", *([family] if family else []), *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
