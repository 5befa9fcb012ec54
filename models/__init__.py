"""Model builders for tests and benchmarks: standard architectures with random weights, no torch.

Imported from the repo root (``from models.zoo import build``); not part of the installed
``onnxopt`` package. See :mod:`models.zoo` for the catalogue and :mod:`models.layers` for
the graph builder.
"""

from .layers import GraphBuilder
from .zoo import BUILDERS, NOT_RUNNABLE, build

__all__ = ["BUILDERS", "NOT_RUNNABLE", "GraphBuilder", "build"]
