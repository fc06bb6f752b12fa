"""The repository root, put on ``sys.path``: ``python bench/<script>.py`` has only bench/
there, and the scripts import ``lib_ostaf`` and ``bench.*``. Each such script starts with

    if not __package__:  # python bench/<script>.py
        import _root  # noqa: F401

and takes ``ROOT`` from ``bench._root`` where it needs it (``python -m bench.<script>``,
the tests and other bench modules find the root on the path already)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
