"""The wheel installs one top-level package, ``cbart``; the repository's folders map into it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(target: Path) -> Path:
    """The files a wheel is built from, copied (a build in the repository would leave build/ and egg-info)."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", ".cache", "build", "results", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    for folder in ("cbart", "compression", "exporter", "runtime", "benchmarks", "serving"):
        shutil.copytree(ROOT / folder, target / folder, ignore=ignore)
    return target


def test_wheel_installs_only_the_cbart_namespace(tmp_path: Path):
    (tmp_path / "source").mkdir()
    source = _source_copy(tmp_path / "source")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("cbart-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"cbart", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("compression/modeling.py", "exporter/export.py", "runtime/generator.py", "benchmarks/worker.py"):
        assert f"cbart/{module}" in names
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    script = (
        "import cbart.runtime.generator as g, cbart.exporter.export as e, cbart.compression as c\n"
        "print(g.__file__); print(e.__file__); print(c.__file__)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert all(line.startswith(str(target)) for line in completed.stdout.splitlines())


def test_no_module_imports_the_folders_by_their_top_level_names():
    """From the repository root `import runtime` would still work (the folder is on sys.path), but not once
    installed: every import goes through the cbart namespace."""
    import re

    pattern = re.compile(r"^\s*(from|import) (compression|exporter|runtime|benchmarks)\b", re.M)
    folders = ("cbart", "compression", "exporter", "runtime", "benchmarks", "tests", "tools")
    offenders = [
        f"{path.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}"
        for folder in folders
        for path in (ROOT / folder).rglob("*.py")
        for text in [path.read_text(encoding="utf-8")]
        for match in pattern.finditer(text)
    ]
    assert not offenders, offenders
