"""Train the supervised real/fake classifier and its abnormality module: `python jobs/train_classifier.py --data CROPS_DIR --epochs 2` (see jobs/train.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:], family="classifier")
