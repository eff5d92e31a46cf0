"""calm-edge: train Continuous Autoregressive Language Models (CALM) and run them on edge devices.

This top-level package holds what every stage shares (configs, tokenizer, data pipeline,
errors, the CLI). It never imports torch at import time, so the torch-free runtime
(`calm_edge.runtime`) can live beside it on a device.
"""

__version__ = "0.1.0"

from calm_edge.errors import CalmEdgeError

__all__ = ["CalmEdgeError", "__version__"]
