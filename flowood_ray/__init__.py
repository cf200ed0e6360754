"""FlowOOD-Ray: deepfake detection as out-of-distribution detection with density models."""

__version__ = "0.1.0"
