"""The package's imports flow one way: every module imports alone, and the import graph has no cycle.

The graph counts every import of a package module, at module level or inside
a function, so a function-level import cannot hide a cycle either.
"""

import ast
import importlib.util
import os

from conftest import REPO, run_python
import pytest

pytestmark = pytest.mark.backend_agnostic

PACKAGE = os.path.join(REPO, "keras_sequencer")


def _modules() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                parts = os.path.relpath(os.path.join(directory, file), REPO)[: -len(".py")].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(directory, file)
    return found


def _imports(path: str, module: str, modules: dict) -> set[str]:
    """The package modules `module` imports (a `from package import submodule` counts as the submodule)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules and t != module}


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: _imports(path, m, modules) for m, path in modules.items()}
    assert graph["keras_sequencer.presets"] == set(), "presets is the leaf every other module reads"
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module is imported first, in a process that has loaded Keras but nothing of this package."""
    code = (
        "import importlib, os, sys, keras, numpy\n"
        f"for name in {sorted(m for m in _modules() if not m.endswith('__main__'))!r}:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException as error:\n"
        "            print('FAILED', name, repr(error), flush=True)\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    _, status = os.waitpid(pid, 0)\n"
        "    print('IMPORTED' if status == 0 else 'EXIT', name, flush=True)\n"
    )
    out = run_python(code, backend="numpy")
    lines = out.splitlines()
    if importlib.util.find_spec("keras_hub") is None:  # the optional module says what to install, and only that
        refused = [line for line in lines if line.startswith("FAILED keras_sequencer.hub ")]
        assert len(refused) == 1 and "pip install 'keras-sequencer[hub]'" in refused[0], out
        lines = [line for line in lines if not line.endswith(" keras_sequencer.hub") and line not in refused]
        lines.append("IMPORTED keras_sequencer.hub")
    assert not [line for line in lines if not line.startswith("IMPORTED")], out
    assert len(lines) == len([m for m in _modules() if not m.endswith("__main__")])
