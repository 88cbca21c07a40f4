"""The package's layering, as ../shared/DESIGN.md draws it, read from the source (no imports run):
`accel/` names no model's internals, imports point one way, and the clean-ups of issue 12 stay done."""

import ast
import inspect
import re
from pathlib import Path

import pytest

import ditserve

PACKAGE = Path(ditserve.__file__).parent
MODEL_WORDS = {"flux", "qwen", "wan", "sd3", "hunyuan", "hunyuanvideo", "cogvideox"}  # models.common.* is shared
# the internals accel/ used to find by name before the plans (issue 12)
INTERNALS = ("mod.lin", "modulation.lin", "final_layer", "qkv_op", "double_blocks", "single_blocks", "img_mod",
             "txt_mod", "head_out", "attn_op")


def sources(folder: str):
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (comments never reach the AST)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def code_names(tree: ast.AST) -> list[tuple[int, str]]:
    """Every identifier, attribute, import and string literal the code uses, docstrings left out."""
    skip, names = docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            names.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            names.append((node.lineno, node.arg))
        elif isinstance(node, ast.alias):
            names.append((node.lineno, node.name))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append((node.lineno, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            names.append((node.lineno, node.value))
    return names


def imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_accel_names_no_model_and_no_model_internals():
    """accel/ reads plans: no family name, none of the internals it once looked up, no probing of
    blocks with hasattr/getattr/setattr on a literal name (a plan field names the site instead)."""
    bad = []
    for path, tree in sources("accel"):
        for line, name in code_names(tree):
            words = set(re.split(r"[^a-z0-9]+", name.lower()))
            if words & MODEL_WORDS or any(i in name for i in INTERNALS):
                bad.append(f"{path.name}:{line}: {name!r}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr", "setattr") and len(node.args) >= 2
                    and "block" in ast.unparse(node.args[0]) and isinstance(node.args[1], ast.Constant)
                    and not str(node.args[1].value).startswith("_")):  # torch's own (_compiled_call_impl)
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


def test_the_guard_sees_what_it_forbids():
    tree = ast.parse('"""FLUX docs may cite models."""\nx = dit.final_layer\nif hasattr(block, "qkv_op"): pass\n')
    assert {n for _, n in code_names(tree)} >= {"final_layer", "qkv_op"}
    assert "FLUX docs may cite models." not in {n for _, n in code_names(tree)}


# DESIGN.md: api, config <- sampling, models, encoders, vae <- pipelines, parallel, accel <- runtime <- server, cli
LOWER = {"api": set(), "config": {"api"}, "sampling": {"api", "config"}, "models": {"api", "config"}}
NEVER_BELOW_RUNTIME = {"runtime", "server", "cli", "demo"}


@pytest.mark.parametrize("folder", ["api", "config", "sampling", "models", "pipelines", "accel", "parallel",
                                    "runtime", "bench"])
def test_imports_point_one_way_and_never_into_the_checkout(folder):
    bad = []
    for path, tree in sources(folder):
        for line, module in imports(tree):
            top, _, rest = module.partition(".")
            if top in ("training", "tests", "benchmarks"):  # the checkout is not the package
                bad.append(f"{path.name}:{line}: {module}")
            if top != "ditserve":
                continue
            sub = rest.partition(".")[0]
            if folder in LOWER and sub not in LOWER[folder] | {folder}:
                bad.append(f"{path.name}:{line}: {module}")
            if folder in ("pipelines", "accel", "parallel") and sub in NEVER_BELOW_RUNTIME:
                bad.append(f"{path.name}:{line}: {module}")
            if folder == "runtime" and sub in ("server", "cli"):
                bad.append(f"{path.name}:{line}: {module}")
    assert not bad, "\n".join(bad)


def test_issue_12_clean_ups_stay_done():
    """Dead code removed, names that clashed renamed, Cancelled beside the other engine errors."""
    from ditserve import accel, api
    from ditserve.api import errors
    from ditserve.pipelines.base import Pipeline
    from ditserve.sampling import flow_match

    assert not hasattr(accel, "apply_cuda_graphs") and not hasattr(Pipeline, "class_names")
    assert "mu" not in inspect.signature(flow_match.schedule).parameters
    assert errors.Cancelled.__module__ == errors.EngineError.__module__ == "ditserve.api.errors"
    assert api.Cancelled is errors.Cancelled
    text = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "batch_key_for" not in text and "apply_cuda_graphs" not in text
    # the pipelines' flow-match config is `scheduler_spec`; `scheduler` is runtime.Scheduler alone
    for path, _ in sources("pipelines"):
        assert not re.search(r"\bself\.scheduler\b", path.read_text()), path.name
