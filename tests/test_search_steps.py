"""Beam search is the same named steps, called in the same order, in runtime/search.py and the C++ runtime.

The steps are internal functions on both sides (no binary reports them), so the check reads the sources:
the calls inside each ``beam_search`` body, in order, against ``BEAM_STEPS``.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from cbart.runtime import search

CPP_SEARCH = Path(__file__).resolve().parents[1] / "runtime" / "cpp" / "src" / "search.cpp"


def python_step_calls() -> list[str]:
    body = ast.parse(inspect.getsource(search.beam_search))
    calls = [node for node in ast.walk(body) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    ordered = sorted(calls, key=lambda node: (node.lineno, node.col_offset))
    return [node.func.id for node in ordered if node.func.id in search.BEAM_STEPS]


def cpp_function_body(source: str, signature: str) -> str:
    start = source.index(signature)
    opening = source.index("{", start)
    depth = 0
    for position in range(opening, len(source)):
        depth += {"{": 1, "}": -1}.get(source[position], 0)
        if depth == 0:
            return source[opening : position + 1]
    raise AssertionError(f"unbalanced braces after {signature!r}")


def cpp_step_calls(source: str) -> list[str]:
    body = cpp_function_body(source, "Rows beam_search(DecoderSession& session")
    pattern = re.compile(r"\b(" + "|".join(search.BEAM_STEPS) + r")\(")
    return pattern.findall(body)


def test_python_beam_search_calls_its_named_steps_in_order():
    assert python_step_calls() == list(search.BEAM_STEPS)
    for name in search.BEAM_STEPS:
        assert callable(getattr(search, name)), name


def test_cpp_beam_search_mirrors_the_python_steps():
    source = CPP_SEARCH.read_text()
    for name in search.BEAM_STEPS:
        assert re.search(rf"^\S[^\n]*\b{name}\(", source, re.MULTILINE), f"search.cpp defines no {name}()"
    assert cpp_step_calls(source) == python_step_calls()


def test_a_reordered_step_is_noticed():
    source = CPP_SEARCH.read_text()
    swapped = source.replace("update_running_beams(state, continuations, s.num_beams);", "@@").replace(
        "update_finished_beams(state, continuations, s);",
        "update_finished_beams(state, continuations, s);\n    update_running_beams(state, continuations, s.num_beams);",
    )
    assert swapped != source
    assert cpp_step_calls(swapped.replace("@@", "")) != python_step_calls()
