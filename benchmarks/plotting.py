"""Matplotlib for the benchmark plots, optional: without it the tables and JSON are still written."""

from __future__ import annotations

import sys
from typing import Any


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (with a hint) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install 'cbart[bench]')", file=sys.stderr)
        return None
    return plt
