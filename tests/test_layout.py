"""The layout's rules, read from the source: imports run one way (entry points -> engine ->
report -> model -> data_tools: model and report never import engine, model imports no report,
data_tools nothing from tuner), and no module or class grows past the size a reader can
hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "api",
    "cli",
    "__main__",
    "search",
    "export_best",
    "predict",
    "dashboard",
    "bench",
    "bench_quality",
    "bench_quantize",
    "bench_scale",
    "bench_chaos",
}
MAX_MODULE_LINES, MAX_CLASS_LINES = 600, 300


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as dotted names
    (``from tuner.model import head`` gives ``tuner.model`` and ``tuner.model.head``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def stage(name: str) -> str | None:
    """``tuner.model.head`` -> ``model``; an entry point -> ``entry``; else None."""
    parts = name.split(".")
    if parts[0] == "data_tools":
        return "data_tools"
    if parts[0] != "tuner" or len(parts) < 2:
        return None
    if parts[1] in ("engine", "model", "report"):
        return parts[1]
    return "entry" if parts[1] in ENTRY_POINTS else None


# Which stages each stage may import (its own always).
ALLOWED = {
    "entry": {"entry", "engine", "model", "report", "data_tools"},
    "engine": {"engine", "model", "report", "data_tools"},
    "model": {"model", "data_tools"},
    "report": {"report", "model", "data_tools"},
    "data_tools": {"data_tools"},
}


def wrong_way_imports(root: Path) -> list[str]:
    problems = []
    for path in sorted([*root.glob("tuner/**/*.py"), *root.glob("data_tools/**/*.py")]):
        relative = path.relative_to(root).with_suffix("")
        own = stage(".".join(relative.parts).removesuffix(".__init__"))
        if own is None:
            continue
        for name in sorted(imported(path)):
            other = stage(name)
            if other is not None and other not in ALLOWED[own]:
                problems.append(f"{relative}.py ({own}) imports {name} ({other})")
    return problems


def test_imports_run_one_way():
    assert wrong_way_imports(ROOT) == []


def test_a_wrong_way_import_is_caught(tmp_path):
    for folder in ("tuner/model", "tuner/engine", "data_tools"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "tuner/engine/strategy.py").write_text("from tuner.model import backbones\n")
    (tmp_path / "tuner/model/head.py").write_text(
        "def f():\n    from tuner.engine import budget\n"  # inside a function counts too
    )
    (tmp_path / "tuner/model/features.py").write_text("from tuner.report.results import X\n")
    (tmp_path / "data_tools/split.py").write_text("import tuner.search\n")
    assert wrong_way_imports(tmp_path) == [
        "data_tools/split.py (data_tools) imports tuner.search (entry)",
        "tuner/model/features.py (model) imports tuner.report.results (report)",
        "tuner/model/features.py (model) imports tuner.report.results.X (report)",
        "tuner/model/head.py (model) imports tuner.engine (engine)",
        "tuner/model/head.py (model) imports tuner.engine.budget (engine)",
    ]


def test_every_module_of_tuner_sits_in_a_stage_or_is_an_entry_point():
    loose = [
        path.name
        for path in (ROOT / "tuner").glob("*.py")
        if path.stem not in ENTRY_POINTS | {"__init__"}
    ]
    assert loose == []
    for name in ENTRY_POINTS:  # the commands stay where users call them
        assert (ROOT / "tuner" / f"{name}.py").is_file()


@pytest.mark.parametrize("package", ["tuner", "data_tools"])
def test_no_module_or_class_is_too_long(package):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    long.append(f"{path.relative_to(ROOT)}: class {node.name}, {size} lines")
    assert long == []


def test_the_wheel_lists_every_package_folder():
    """pyproject.toml lists the packages (search_spaces/ ships as tuner.search_spaces): a new
    package folder missing from the list would be missing from the wheel."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: name for name, folder in setup["package-dir"].items()}
    found = set()
    for init in [*ROOT.glob("tuner/**/__init__.py"), *ROOT.glob("data_tools/**/__init__.py")]:
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for init in ROOT.glob("search_spaces/**/__init__.py"):
        folder = init.parent.relative_to(ROOT).as_posix()
        top, _, rest = folder.partition("/")
        found.add(".".join([mapped[top], *([rest.replace("/", ".")] if rest else [])]))
    assert found == set(setup["packages"])
    assert {"*.yaml"} == set(setup["package-data"]["tuner.search_spaces"])


ADAPTER = "tuner/engine/adapter.py"


def relied_on_privates(root: Path) -> set[str]:
    """The private Keras Tuner names the adapter declares (its ``*_PRIVATE`` tuples)."""
    names = set()
    for node in ast.parse((root / ADAPTER).read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id.endswith("_PRIVATE"):
            names.update(ast.literal_eval(node.value))
    return names


def keras_tuner_internals(root: Path, private: set[str]) -> list[str]:
    """Uses of Keras Tuner's internals outside the adapter: imports of ``keras_tuner.src``,
    and the private names the adapter relies on, defined or read anywhere else."""
    found = []
    for path in sorted([*root.glob("tuner/**/*.py"), *root.glob("data_tools/**/*.py")]):
        where = path.relative_to(root).as_posix()
        if where == ADAPTER:
            continue
        for name in sorted(imported(path)):
            if name == "keras_tuner.src" or name.startswith("keras_tuner.src."):
                found.append(f"{where} imports {name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{where}:{node.lineno} uses {node.attr}")
            if isinstance(node, ast.FunctionDef) and node.name in private:
                found.append(f"{where}:{node.lineno} defines {node.name}")
    return found


def test_keras_tuner_internals_are_used_in_the_adapter_alone():
    private = relied_on_privates(ROOT)
    assert {"_build_and_fit_model", "_retry_queue", "_try_build"} <= private
    assert keras_tuner_internals(ROOT, private) == []


def test_a_keras_tuner_internal_outside_the_adapter_is_caught(tmp_path):
    (tmp_path / "tuner/engine").mkdir(parents=True)
    (tmp_path / ADAPTER).write_text('TUNER_PRIVATE = ("_try_build",)\nORACLE_PRIVATE = ()\n')
    (tmp_path / "tuner/engine/trial.py").write_text(
        "from keras_tuner.src.engine import tuner_utils\n"
        "class Runner:\n"
        "    def _try_build(self, hp):\n"
        "        return self.oracle._try_build(hp)\n"
    )
    private = relied_on_privates(tmp_path)
    assert keras_tuner_internals(tmp_path, private) == [
        "tuner/engine/trial.py imports keras_tuner.src.engine",
        "tuner/engine/trial.py imports keras_tuner.src.engine.tuner_utils",
        "tuner/engine/trial.py:3 defines _try_build",
        "tuner/engine/trial.py:4 uses _try_build",
    ]


def _module_name(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _top_level_imports(path: Path) -> set[str]:
    """What a module imports when it loads or is type-checked: its body's imports, those
    under ``if TYPE_CHECKING:`` and ``try:`` included, but not those inside functions."""
    names = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            stack.extend(h for handler in getattr(node, "handlers", []) for h in handler.body)
    return names


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles of imports between the package's modules: every import of a stage module
    (engine, model, report, data_tools), type-only ones included; an entry point's at load
    time (the commands and the API call each other lazily: ``tuner.search(...)`` is the API,
    and the API reads the command's options)."""
    paths = {
        _module_name(root, p): p
        for p in [*root.glob("tuner/**/*.py"), *root.glob("data_tools/**/*.py")]
    }
    graph = {}
    for name, path in paths.items():
        found = imported(path) if stage(name) not in (None, "entry") else _top_level_imports(path)
        graph[name] = sorted(n for n in found if n in paths and n != name)
    cycles, done = [], set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name) :]
            if sorted(cycle) not in [sorted(c) for c in cycles]:
                cycles.append(cycle)
            return
        if name in done:
            return
        for other in graph[name]:
            visit(other, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_no_import_cycle_type_only_ones_included():
    assert import_cycles(ROOT) == []


def test_a_type_only_import_cycle_is_caught(tmp_path):
    (tmp_path / "tuner/model").mkdir(parents=True)
    (tmp_path / "tuner/model/hypermodel.py").write_text("from tuner.model import training\n")
    (tmp_path / "tuner/model/training.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from tuner.model.hypermodel import TrialPlan\n"
    )
    (tmp_path / "tuner/model/head.py").write_text("def f():\n    from tuner.model import space\n")
    (tmp_path / "tuner/model/space.py").write_text("from tuner.model import head\n")
    assert import_cycles(tmp_path) == [
        ["tuner.model.head", "tuner.model.space"],
        ["tuner.model.hypermodel", "tuner.model.training"],
    ]


MAX_FUNCTION_LINES = 60


def long_functions(root: Path) -> list[str]:
    """Functions over :data:`MAX_FUNCTION_LINES` lines of code (the docstring not counted)
    whose docstring gives no reason (a paragraph starting ``Long:``, saying why it reads
    better whole)."""
    found = []
    for path in sorted([*root.glob("tuner/**/*.py"), *root.glob("data_tools/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            size = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                size -= first.end_lineno - first.lineno + 1  # the docstring is not code
            doc = ast.get_docstring(node) or ""
            reason = any(line.strip().startswith("Long: ") for line in doc.splitlines())
            if size > MAX_FUNCTION_LINES and not reason:
                found.append(f"{path.relative_to(root).as_posix()}: {node.name}, {size} lines")
    return found


def test_no_long_function_without_its_reason():
    assert long_functions(ROOT) == []


def test_a_long_function_is_caught_unless_it_says_why(tmp_path):
    (tmp_path / "tuner").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    (tmp_path / "tuner/a.py").write_text(
        f'def long():\n    """Does it."""\n{body}'
        f'def reasoned():\n    """Does it.\n\n    Long: a table.\n    """\n{body}'
        f"def short():\n{body[: -len('    x59 = 59')]}"
    )
    assert long_functions(tmp_path) == ["tuner/a.py: long, 61 lines"]
