"""The code's shape, checked: a stack core <- middle <- scripts with no upward import, no sys.path surgery, short
functions, no repeated blocks, a line budget, and console commands that start the same mains as the script paths.

docs/architecture.md draws the stack; this file is what keeps the drawing true.
"""

import ast
import hashlib
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("sft", "eval", "bench")
CORE = {"config", "data", "template", "sources", "tiny_model", "model", "scoring", "metrics", "stats", "artifacts",
        "ranks", "quiet", "eval_report", "model_card"}
MIDDLE = {"trainer", "run", "evaluation", "predictor", "serving"}
SCRIPTS = {"sft.train", "eval.evaluate", "eval.predict", "eval.merge", "eval.serve"}
LINE_BUDGET = 4972  # code lines of sft/ + eval/ + bench/ (blank and comment lines not counted, as cloc counts)
MAX_FUNCTION_LINES = 50


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO / d).glob("*.py"))


def layer(module: str) -> int:
    """0 core, 1 middle (trainer, run, evaluation, predictor, serving), 2 scripts (sft/train.py, eval/*, bench/*)."""
    package, _, name = module.partition(".")
    if package == "sft" and name in CORE:
        return 0
    if package == "sft" and name in MIDDLE:
        return 1
    if module in SCRIPTS or package in ("eval", "bench"):
        return 2
    raise AssertionError(f"{module}: not placed in a layer; add it to CORE, MIDDLE or SCRIPTS here and in "
                         "docs/architecture.md")


def project_imports(path: Path) -> set[str]:
    """Every sft.* / eval.* / bench-sibling module the file imports, at the top or inside functions."""
    found = set()
    siblings = {p.stem for p in path.parent.glob("*.py")} if path.parent.name == "bench" else set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            is_module = (REPO / f"{name.replace('.', '/')}.py").is_file()
            if name.split(".")[0] in ("sft", "eval") and name.count(".") == 1 and is_module:
                found.add(name)
            elif name in siblings:
                found.add(f"bench.{name}")
    return found


def test_every_module_has_a_layer_and_imports_only_downwards():
    """Core imports core only; the middle layer imports core and middle; nothing imports a script, except that
    bench scripts share bench/benchlib.py."""
    problems = []
    for path in code_files():
        if path.name == "__init__.py":
            continue
        importer = module_name(path)
        for imported in project_imports(path) - {importer}:
            if imported == "bench.benchlib" and importer.startswith("bench."):
                continue
            if layer(imported) == 2 or layer(imported) > layer(importer):
                problems.append(f"{importer} (layer {layer(importer)}) imports {imported} (layer {layer(imported)})")
    assert not problems, "\n".join(problems)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above must be able to fail: a core module importing a script is caught."""
    fake = REPO / "sft" / "_layer_probe.py"
    try:
        fake.write_text("def f():\n    from eval.evaluate import main\n", encoding="utf-8")
        CORE.add("_layer_probe")
        with pytest.raises(AssertionError, match="sft._layer_probe .layer 0. imports eval.evaluate"):
            test_every_module_has_a_layer_and_imports_only_downwards()
    finally:
        CORE.discard("_layer_probe")
        fake.unlink()


def test_no_sys_path_manipulation():
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in code_files()
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "sys.path" in line]
    assert not offenders, offenders


def test_functions_are_short():
    long = []
    for path in code_files():
        if path.parent.name == "bench":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def code_line_count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.strip().startswith("#"))


def test_line_budget():
    total = sum(code_line_count(p) for p in code_files())
    assert total <= LINE_BUDGET, f"sft/ + eval/ + bench/ hold {total} code lines (budget {LINE_BUDGET})"


def normalized_code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines that carry code: no blanks, comments, docstring-only or import lines."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = re.sub(r"\s+", " ", line.strip())
        if text and not text.startswith(("#", "import ", "from ")) and text not in (")", "]", "}", '"""', "),"):
            out.append((n, text))
    return out


def test_no_block_of_six_lines_is_written_twice():
    """Six consecutive code lines that stand again elsewhere in sft/, eval/ or bench/ (tests are exempt)."""
    seen: dict[str, list[str]] = defaultdict(list)
    for path in code_files():
        lines = normalized_code_lines(path)
        for i in range(len(lines) - 5):
            window = "\n".join(text for _, text in lines[i : i + 6])
            seen[hashlib.sha1(window.encode()).hexdigest()].append(f"{path.relative_to(REPO)}:{lines[i][0]}")
    repeated = [places for places in seen.values() if len(places) > 1]
    assert not repeated, repeated[:5]


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def test_console_scripts_point_at_the_script_mains():
    import importlib

    scripts = console_scripts()
    wanted = {"train": "sft.train", "evaluate": "eval.evaluate", "predict": "eval.predict", "merge": "eval.merge",
              "audit": "sft.data", "serve": "eval.serve"}
    for command, module in wanted.items():
        target = scripts[f"sentiment-{command}"]
        assert target.split(":")[0] == module, target
        assert callable(getattr(importlib.import_module(module), target.split(":")[1]))


@pytest.mark.parametrize("command", ["sentiment-train", "sentiment-evaluate", "sentiment-predict", "sentiment-merge",
                                     "sentiment-audit", "sentiment-serve"])
def test_console_commands_are_installed_and_answer_help(command):
    exe = shutil.which(command) or str(Path(sys.executable).parent / command)
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
