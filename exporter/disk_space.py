"""Free-space pre-flight for exports.

Why: a full disk does not fail where it happens. ONNX's shape inference, which ONNX Runtime's int8
quantizer runs on a copy of each graph in the temp directory, writes that copy from C++ and does not
report a short write; the quantizer then fails parsing a truncated protobuf ("Wire format was corrupt"),
which names neither the disk nor the fix. Checking first turns that into an error that says both.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1024:.1f} KiB"


@dataclass(frozen=True)
class DiskNeed:
    """Bytes an export needs at its peak, where it writes them."""

    destination: int
    temp: int


def export_need(parameter_bytes: int, quantize: bool, with_torch: bool, engines: bool) -> DiskNeed:
    """A generous estimate of an export's peak footprint from the fp32 size of the model's weights.

    The ONNX graphs hold the embedding tables once per graph that reads them, plus the screened LM head's
    rows, so an fp32 export measures about 1.8x the weights (bart-base: 1.0 GB for 0.56 GB of weights);
    int8 quantization keeps the fp32 graph and its int8 copy side by side until the rename. TorchScript
    copies add another set, TensorRT engines one more. The quantizer's shape-inferred copy of a graph goes
    to the temp directory.
    """
    destination = 2 * parameter_bytes
    if with_torch:
        destination += 2 * parameter_bytes
    if engines:
        destination += parameter_bytes
    return DiskNeed(destination=destination, temp=parameter_bytes if quantize else 0)


def _existing(path: Path) -> Path:
    """The nearest existing ancestor: the destination's parent may not have been created yet."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def space_problems(destination: Path, need: DiskNeed) -> list[str]:
    """What is short, as messages that name the place, the amounts and the fix; empty when all fits.

    When the destination and the temp directory share a filesystem, their needs add up.
    """
    places = [(_existing(destination.parent), need.destination, "the export directory", "choose another --out")]
    if need.temp:
        places.append((_existing(Path(tempfile.gettempdir())), need.temp, "the temp directory", "set TMPDIR"))
    by_device: dict[int, list[tuple[Path, int, str, str]]] = {}
    for place in places:
        by_device.setdefault(place[0].stat().st_dev, []).append(place)
    problems = []
    for shared in by_device.values():
        needed = sum(place[1] for place in shared)
        free = shutil.disk_usage(shared[0][0]).free
        if free < needed:
            where = " and ".join(f"{what} ({path})" for path, _, what, _ in shared)
            fixes = " or ".join(fix for *_, fix in shared)
            problems.append(
                f"not enough free disk space for {where}: the export needs about {_size(needed)} and "
                f"{_size(free)} is free; free some space or {fixes} on a filesystem with room"
            )
    return problems
