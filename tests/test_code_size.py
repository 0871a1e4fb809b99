"""The library stays in small pieces: no class longer than 250 lines, no function longer than 80."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("verl_sb3", "textenv_gym")
MAX_LINES = {ast.ClassDef: 250, ast.FunctionDef: 80}


def definitions():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                kind = ast.ClassDef if isinstance(node, ast.ClassDef) else ast.FunctionDef
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", kind, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("kind", list(MAX_LINES), ids=["classes", "functions"])
def test_no_definition_is_too_long(kind):
    too_long = [
        f"{where} ({lines} lines)" for where, k, lines in definitions() if k is kind and lines > MAX_LINES[kind]
    ]
    assert not too_long, f"longer than {MAX_LINES[kind]} lines: {too_long}"
