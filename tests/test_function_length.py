"""The readability rule: no function of the project's Python files grows past MAX_CODE_LINES code
lines (docstrings, comments and blank lines not counted; a nested function counts inside its parent)."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_CODE_LINES = 80
FOLDERS = ("code", "bench", "experiments", "scripts")


def docstring_lines(tree):
    """The line numbers of every docstring (module, class, function) in ``tree``."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def long_functions(source, limit=MAX_CODE_LINES):
    """``[(name, first line, code lines)]`` of the functions in ``source`` with more than ``limit``
    code lines."""
    tree = ast.parse(source)
    text = source.splitlines()
    docs = docstring_lines(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        count = sum(1 for n in range(node.lineno, node.end_lineno + 1)
                    if n not in docs and text[n - 1].strip() and not text[n - 1].strip().startswith("#"))
        if count > limit:
            found.append((node.name, node.lineno, count))
    return found


def test_counter_skips_docstrings_comments_and_blank_lines():
    body = "\n".join(f"    x{k} = {k}" for k in range(3))
    source = f'def f():\n    """doc\n    more doc"""\n    # a comment\n\n{body}\n    return x0\n'
    # def line + 3 assignments + return = 5 code lines
    assert long_functions(source, limit=4) == [("f", 1, 5)]
    assert long_functions(source, limit=5) == []


def test_nested_functions_count_inside_their_parent():
    source = "def outer():\n    def inner():\n        a = 1\n        return a\n    return inner\n"
    assert long_functions(source, limit=4) == [("outer", 1, 5)]


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_function_is_longer_than_the_limit(folder):
    files = sorted((REPO / folder).rglob("*.py"))
    if folder == "code":
        assert files, "code/ holds the project's Python files"
    too_long = [f"{path.relative_to(REPO)}:{line} {name} ({count} code lines)"
                for path in files for name, line, count in long_functions(path.read_text())]
    assert not too_long, f"functions over {MAX_CODE_LINES} code lines: {too_long}"
