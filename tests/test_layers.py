"""The layers of code/ (.importlinter, docs/architecture.md) are checked by import-linter: the
project keeps them, and a lower layer that imports a higher one fails."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lint(code_dir):
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", str(REPO / ".importlinter"), "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=code_dir)


def test_the_code_keeps_its_layers():
    result = lint(REPO / "code")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, imported", [
    ("dataloaders/augment.py", "training.engine"),   # data must not reach the engine
    ("evaluation/metrics.py", "training.run"),       # evaluation sits below training
    ("utils/sscd.py", "networks.unet"),              # the method and the networks are independent
    ("common/geometry.py", "dataloaders.dataset"),   # the helpers import nothing of the project
])
def test_an_import_upward_or_across_fails(tmp_path, module, imported):
    code = tmp_path / "code"
    shutil.copytree(REPO / "code", code, ignore=shutil.ignore_patterns("__pycache__"))
    path = code / module
    path.write_text(path.read_text() + f"\nimport {imported}  # noqa: E402,F401\n")
    result = lint(code)
    assert result.returncode == 1
    assert "0 kept, 1 broken" in result.stdout
    assert f"{module[:-3].replace('/', '.')} -> {imported}" in result.stdout


def code_lines(node, source):
    """Lines of ``node`` that hold code: not blank, not a comment, not its docstring."""
    doc = set()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for n in range(node.lineno, node.end_lineno + 1)
               if n not in doc and source[n - 1].strip() and not source[n - 1].strip().startswith("#"))


def test_no_function_or_class_is_longer_than_a_sitting():
    """About 80 code lines at most for every function and class of code/, experiments/, bench/ and
    scripts/ (STYLE: what one reads in a sitting)."""
    long = []
    for folder in ("code", "experiments", "bench", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            source = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(source))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    n = code_lines(node, source)
                    if n > 80:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_the_line_counter_counts_code_only():
    source = ['def f(x):', '    """Doc', '    string."""', '', '    # a comment', '    y = x + 1', '    return y']
    node = ast.parse("\n".join(source)).body[0]
    assert code_lines(node, source) == 3


def test_a_checkpoint_names_no_module_of_this_project(tmp_path, synthetic_root):
    """What a trainer saves (weights, optimizer, RNG, config with the model card) pickles only torch's
    and the standard library's types: moving a module of code/ cannot break a checkpoint."""
    import pickletools
    import zipfile

    import torch

    from common.checkpoint import rng_state, save_checkpoint
    from evaluation.model_card import model_card
    from networks.unet import build_model
    model = build_model(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.rand(2, 1, 32, 32)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(), "iteration": 3,
             "config": {"image_size": 32, "model_card": model_card("ACDC", synthetic_root, 4, 32)}}
    save_checkpoint(state, tmp_path / "last.pth")
    with zipfile.ZipFile(tmp_path / "last.pth") as z:
        pickle = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    globals_ = {arg for op, arg, _ in pickletools.genops(pickle) if op.name in ("GLOBAL", "STACK_GLOBAL") and arg}
    modules = {g.split()[0] for g in globals_}
    assert modules and all(m.split(".")[0] in ("torch", "collections", "_codecs") for m in modules), modules
