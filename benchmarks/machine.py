"""What machine a result comes from: CPU model and the instruction-set flags that rank int8 and bf16 paths
(results from different machines do not mix; every results file records this)."""

from __future__ import annotations

import platform
import subprocess
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model and the flags that decide int8/bf16 speed (results from different machines do not mix)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "flags": [flag for flag in wanted if flag in flags],
        "bf16_training": bool(flags & {"avx512_bf16", "amx_bf16"}),
    }
