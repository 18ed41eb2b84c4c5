"""``cbart demo`` meets its bar: >= 95% exact match for the compressed model, offline."""

from __future__ import annotations

from cbart.cli import main


def test_demo_compresses_and_keeps_exact_match(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(target >= 95%: PASS)" in out
    assert (tmp_path / "compressed" / "model.safetensors").is_file()
