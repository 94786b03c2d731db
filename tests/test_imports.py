"""The import rules of README "Architecture", checked on the source (ast, nothing imported):

- arrows point down the stack fdf_core < data_prep < fdf_builder < training < eval < fdf_pipeline,
  slurm (the last two side by side, neither importing the other); a module may import its own
  package and any package below it;
- no module imports a console-script module (`<package>.cli`): the scripts sit on top of their
  stage and nothing builds on them;
- no stage imports a plot module (eval.plots, the only one that imports matplotlib) except the
  cli modules and fdf_pipeline, whose last stage draws fdf-plot-fid's figure.

benchmarks/ and tests/ may import anything.
"""
from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"fdf_core": 0, "data_prep": 1, "fdf_builder": 2, "training": 3, "eval": 4, "fdf_pipeline": 5, "slurm": 5}
PLOTS = {"eval.plots"}
PLOT_LIBRARIES = {"matplotlib"}


def _parse(source: str) -> ast.Module:
    """`ast.parse`, in a fresh interpreter when this one refuses: CPython 3.11 before 3.11.5 (Debian
    12's python3) raises "SystemError: AST constructor recursion depth mismatch" (gh-106905) once a
    library has changed the recursion limit earlier in the process, as other tests' imports do."""
    try:
        return ast.parse(source)
    except SystemError:
        code = "import ast, pickle, sys; sys.stdout.buffer.write(pickle.dumps(ast.parse(sys.stdin.read())))"
        done = subprocess.run([sys.executable, "-c", code], input=source.encode(), capture_output=True, check=True)
        return pickle.loads(done.stdout)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in `source`, `from a import b` as both a and a.b
    (b may be a module), relative imports resolved against `package`."""
    out = []
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package, *filter(None, [base])])
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def violations(path: str, source: str) -> list[str]:
    """What breaks the rules in one module of our packages (`path`: relative to the repo)."""
    parts = Path(path).with_suffix("").parts
    package, module = parts[0], ".".join(parts)
    is_cli, found = parts[-1] == "cli", []
    for line, name in imported_modules(source, package):
        top = name.split(".")[0]
        where = f"{path}:{line}: imports {name}"
        if top in LAYERS and top != package and LAYERS[top] >= LAYERS[package]:
            found.append(f"{where}, which is not below {package} ({' < '.join(LAYERS)})")
        if name.split(".")[-1] == "cli" and top in LAYERS and name != module:
            found.append(f"{where}, a console-script module")
        if name in PLOTS and not (is_cli or package == "fdf_pipeline"):
            found.append(f"{where}, a plot module")
        if top in PLOT_LIBRARIES and module not in PLOTS:
            found.append(f"{where}: plotting belongs in a plot module ({', '.join(sorted(PLOTS))})")
    return found


def _modules() -> list[Path]:
    return sorted(p for package in LAYERS for p in (REPO / package).rglob("*.py"))


def test_every_package_is_scanned():
    assert {p.relative_to(REPO).parts[0] for p in _modules()} == set(LAYERS)
    assert len(_modules()) > 50


@pytest.mark.parametrize("package", list(LAYERS))
def test_imports_point_down_and_never_at_a_cli_or_plot(package):
    found = [v for p in _modules() if p.relative_to(REPO).parts[0] == package
             for v in violations(str(p.relative_to(REPO)), p.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path,source,expected", [
    ("fdf_core/x.py", "from data_prep import plan", "not below fdf_core"),
    ("training/x.py", "import eval.wider", "not below training"),
    ("slurm/x.py", "from fdf_pipeline.pipeline import run", "not below slurm"),
    ("eval/x.py", "from fdf_builder.cli import main", "console-script module"),
    ("eval/x.py", "from fdf_builder import cli", "console-script module"),
    ("eval/x.py", "from eval.plots import plot_fid", "a plot module"),
    ("eval/x.py", "from .plots import plot_fid", "a plot module"),
    ("training/x.py", "import matplotlib.pyplot as plt", "plotting belongs in a plot module"),
])
def test_the_checker_finds_each_kind_of_violation(path, source, expected):
    assert any(expected in v for v in violations(path, source)), violations(path, source)


@pytest.mark.parametrize("path,source", [
    ("eval/x.py", "from fdf_builder.face_models import load_detector\nfrom fdf_core import fid"),
    ("eval/cli.py", "from eval.plots import PlotConfig"),
    ("fdf_pipeline/pipeline.py", "from eval.plots import run"),
    ("data_prep/cli.py", "from fdf_core.cli_util import parse_dataclass"),
])
def test_the_checker_allows_what_the_rules_allow(path, source):
    assert violations(path, source) == []


def test_the_anonymizer_does_not_import_lightning():
    """PyTorch Lightning is most of `anonymize`'s start-up (tens of seconds on a busy machine):
    painting faces needs the networks and the sample decoder only (training.networks, training.samples)."""
    code = "import sys, eval.cli, eval.anonymize, eval.video; print(sorted(m for m in sys.modules if 'lightning' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
