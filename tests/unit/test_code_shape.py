"""The code's shape, checked: the core and the service machinery import no jina and no module imports itself back
in a circle; files and functions stay short enough to read in one sitting (issue 17)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / 'executor'
CORE = ('executor.tuning', 'executor.service')
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60  # a function's body, its docstring left out


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return found


def _outside_type_checking(tree: ast.Module) -> list[ast.stmt]:
    """Every import statement except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, 'id', getattr(node.test, 'attr', None)) == 'TYPE_CHECKING':
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, at module level or inside functions."""
    out = set()
    for node in _outside_type_checking(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif node.module and node.level == 0:
            for alias in node.names:  # `from package import module` names the module itself
                target = f'{node.module}.{alias.name}'
                out.add(target if target in known else node.module)
    return {m for m in out if m in known and m != name}


def test_the_core_and_the_service_machinery_import_no_jina():
    names = [m for m in modules() if m.startswith(CORE)]
    code = (
        'import importlib, sys\n'
        f'for name in {names!r}:\n'
        '    importlib.import_module(name)\n'
        "print(len(sys.modules), 'jina' in sys.modules, sorted(m for m in sys.modules if m.startswith('jina')))"
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) > 40 and out[1] == 'False', out


def test_no_module_imports_itself_back_in_a_circle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert 'executor.tuning.callbacks' in graph['executor.tuning.trainer']
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                cycles.append(' -> '.join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 'done'

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_files_and_functions_are_short():
    long_files, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f'{name}: {len(text.splitlines())} lines')
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], 'value', None), ast.Constant):
                    body = body[1:] or body
                length = body[-1].end_lineno - body[0].lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f'{name}.{node.name}: {length} lines')
    assert long_files == [] and long_functions == []
