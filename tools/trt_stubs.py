"""Make the installed ``tensorrt-stubs`` (TensorRT 10.13 API) usable by mypy.

The published stubs have two kinds of syntax errors that make mypy reject the whole file -- a few
plugin methods take a parameter named ``in`` (a Python keyword), and a few signatures put a
parameter without a default after one with a default -- and they lack a ``py.typed`` marker. This copies them into
``OUT/tensorrt`` and ``OUT/tensorrt_bindings`` with that
parameter renamed. ``mypy_path`` in pyproject.toml points at OUT, which mypy searches before
site-packages.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

KEYWORD_PARAMETER = re.compile(r"([(,]\s*)in:")
SIGNATURE = re.compile(r"^(\s*def \w+\()(.*)(\) -> .*:\s*)$")


def _split_parameters(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[(" and 1 or 0
        depth -= char in "])" and 1 or 0
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current] if current.strip() else parts


def _fix_defaults(line: str) -> str:
    """Give ``= ...`` to parameters that follow one with a default (a syntax error otherwise)."""
    match = SIGNATURE.match(line)
    if not match:
        return line
    parameters = _split_parameters(match.group(2))
    seen_default = False
    for index, parameter in enumerate(parameters):
        if "=" in parameter:
            seen_default = True
        elif seen_default and not parameter.strip().startswith("*"):
            parameters[index] = f"{parameter} = ..."
    return match.group(1) + ",".join(parameters) + match.group(3)


def fix(text: str) -> str:
    return "\n".join(_fix_defaults(line) for line in KEYWORD_PARAMETER.sub(r"\1in_:", text).splitlines()) + "\n"


def stub_root() -> Path:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1")
    return Path(next(iter(spec.submodule_search_locations))).parent


def main(out: Path) -> None:
    root = stub_root()
    for package in ("tensorrt", "tensorrt_bindings"):
        target = out / package
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for stub in (root / package).glob("*.pyi"):
            (target / stub.name).write_text(fix(stub.read_text()))
    print(f"TensorRT stubs for mypy in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/trt-stubs"))
