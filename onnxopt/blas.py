"""numpy's BLAS/LAPACK on one thread for the duration of a block.

OpenBLAS threads spin while they wait: on a busy 2-core machine (onnxruntime sessions, other
processes) a 512×512 ``eigh`` measured 8 s with default threads and 0.3 s on one. Passes that
do heavy numpy linear algebra (decompositions, least squares) run it inside
:func:`one_blas_thread`.
"""

from __future__ import annotations

import contextlib

try:
    from threadpoolctl import ThreadpoolController

    _CONTROLLER = ThreadpoolController()
except ImportError:  # pragma: no cover - threadpoolctl is a declared dependency
    _CONTROLLER = None


def one_blas_thread():
    """Context manager: BLAS calls inside run on one thread."""
    if _CONTROLLER is None:
        return contextlib.nullcontext()
    return _CONTROLLER.limit(limits=1, user_api="blas")
