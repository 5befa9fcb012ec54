"""``python -m onnxopt``: the same as the ``onnxopt`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
