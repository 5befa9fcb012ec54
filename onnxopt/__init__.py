"""onnxopt: an ONNX graph-level optimizing compiler.

Python API::

    import onnxopt
    model = onnxopt.load_model("model.onnx")
    result = onnxopt.optimize(model, preset="lossless", target="cpu")
    onnxopt.save_model(result.model, "out.onnx")
"""

from __future__ import annotations

__version__ = "0.1.0"

# In a source checkout the pass library sits in ../passes; an installed onnxopt gets it as
# onnxopt/passes through setuptools' package-dir mapping. Make both import the same way.
import os as _os

_checkout_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "passes")) and _os.path.isfile(
        _os.path.join(_checkout_root, "passes", "__init__.py")):
    __path__.append(_checkout_root)

from .context import PassContext
from .errors import OnnxoptError, UserInputError, ValidationFailed
from .io import load_model, save_model
from .manager import ManagerResult, PassManager
from .pass_base import Pass, PassResult
from .registry import all_passes, get_pass, make_pass, parse_pass_spec, register_pass


def optimize(model, *, preset: str = "lossless", passes: list | None = None, target: str = "cpu",
             verify_each: bool = False, ctx: PassContext | None = None) -> ManagerResult:
    """Run a preset (or explicit passes: Pass instances or ``name:key=value`` specs) on a ModelProto."""
    from .presets import preset_passes

    if passes:
        chosen = [p if isinstance(p, Pass) else parse_pass_spec(p) for p in passes]
    else:
        chosen = preset_passes(preset, target)
    ctx = ctx or PassContext(target=target)
    return PassManager(chosen, verify_each=verify_each).run(model, ctx)


__all__ = [
    "OnnxoptError", "Pass", "PassContext", "PassManager", "PassResult", "ManagerResult", "UserInputError",
    "ValidationFailed", "all_passes", "get_pass", "load_model", "make_pass", "optimize", "parse_pass_spec",
    "register_pass", "save_model",
]
