"""Model builders for tests and benchmarks: standard architectures with random weights, no torch.

Imported from the repo root (``from models.zoo import build``); not part of the installed
``onnxopt`` package. See :mod:`models.zoo` for the catalogue (also ``python -m models.zoo
--list``) and :mod:`models.layers` for the graph builder.
"""

__all__ = ["BUILDERS", "NOT_RUNNABLE", "GraphBuilder", "build"]


def __getattr__(name):
    # Imported on first use so that `python -m models.zoo` does not import models.zoo twice.
    if name == "GraphBuilder":
        from .layers import GraphBuilder
        return GraphBuilder
    if name in ("BUILDERS", "NOT_RUNNABLE", "build"):
        from . import zoo
        return getattr(zoo, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
