"""The pyfunc model "from code" that every registered version points at.

`mlflow.pyfunc.load_model("models:/flowood-glow@champion").predict(crops)` takes uint8 face
crops (N, H, W, 3) and returns one column per score; it rebuilds the modules through our
own code from the bundle's configs and state_dicts, never from a pickle. For the clip family the
crops are read as one video's frames in temporal order.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd


class FlowoodModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from flowood_ray.registry import load_bundle
        from flowood_ray.scoring.scorers import build_scorer

        self.scorer = build_scorer(load_bundle(context.artifacts["bundle"]))

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        crops = np.asarray(model_input, dtype=np.uint8)
        return pd.DataFrame({k: v for k, v in self.scorer.score(crops).items() if v.ndim == 1})


mlflow.models.set_model(FlowoodModel())
