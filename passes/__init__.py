"""The built-in pass library (imported as ``onnxopt.passes``); one module per family.

Importing this package registers every built-in pass.
"""

import importlib

_FAMILIES = ("cleanup", "folding", "cse", "fusion", "layout", "conversion", "runtime_fusion", "horizontal", "equalize", "quantize", "lowrank", "weight_sharing", "channel_pruning")

for _family in _FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")
