"""The architecture, checked: the core (``executor.tuning``) imports nothing of the service or of jina, the service
machinery (``executor.service``) nothing of the jina layer; inside the core each layer builds only on the layers
below it; no module, and no package of the core, imports itself back in a circle; functions stay short enough to read
in one sitting. Files are as long as their concept needs (issue 28: a line limit had split modules in the wrong
places)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / 'executor'
CORE = ('executor.tuning', 'executor.service')
MAX_FUNCTION_LINES = 60  # a function's body, its docstring left out
# The core's layers, lowest first: a module (or package) of the core imports from its own layer and those below only.
LAYERS = [
    # foundations: errors, files on disk, devices, constructor options, optimizers and losses by name, the artifact's
    # file names
    ['errors', 'files', 'devices', 'distributed', 'batch_size', 'wise_ft', 'options', 'optim', 'losses', 'artifact'],
    ['data', 'inputs'],  # items, and how a model's inputs turn them into batches
    ['models', 'pair_losses', 'matryoshka', 'config', 'quantize', 'evaluation'],  # models, objectives, options
    # what uses models: export and serving, tasks, callbacks and reports, Finetuner's callbacks
    ['export', 'inference', 'two_tower_encoder', 'onnx_cache', 'tasks', 'callbacks', 'reports', 'schedulers'],
    ['hard_negatives'],  # negatives mined with a model, for the plan's pairs
    ['trackers', 'finetuner_callbacks', 'finetuner_compat', 'plan'],  # a run's trackers, Finetuner's dialect, plans
    ['trainer'],  # the loop
    ['__init__', '__main__'],  # the package's API and command line
]


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


def core_unit(name: str) -> str:
    """The core's module or package that ``name`` belongs to (``executor.tuning.models.registry`` -> ``models``)."""
    parts = name.split('.')
    return parts[2] if len(parts) > 2 else '__init__'


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_core_imports_nothing_of_the_service_and_the_service_nothing_of_the_jina_layer():
    wrong = []
    for name, targets in graph().items():
        for target in sorted(targets):
            if name.startswith('executor.tuning') and not target.startswith('executor.tuning'):
                wrong.append(f'{name} -> {target} (the core imports only the core)')
            if name.startswith('executor.service') and not target.startswith(CORE):
                wrong.append(f'{name} -> {target} (the service machinery imports no jina layer)')
    assert wrong == []


def test_each_layer_of_the_core_builds_only_on_the_layers_below():
    layer_of = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    core = {name: targets for name, targets in graph().items() if name.startswith('executor.tuning')}
    unplaced = sorted({core_unit(name) for name in core} - set(layer_of))
    assert unplaced == [], f'put these modules of the core in a layer of LAYERS: {unplaced}'
    upward = [
        f'{name} (layer {layer_of[core_unit(name)]}) -> {target} (layer {layer_of[core_unit(target)]})'
        for name, targets in core.items()
        for target in sorted(targets)
        if layer_of[core_unit(target)] > layer_of[core_unit(name)]
    ]
    assert upward == []


def test_no_package_of_the_core_imports_another_that_imports_it_back():
    units: dict[str, set[str]] = {}
    for name, targets in graph().items():
        if name.startswith('executor.tuning.'):
            units.setdefault(core_unit(name), set()).update(
                core_unit(t) for t in targets if t.startswith('executor.tuning.') and core_unit(t) != core_unit(name)
            )
    both_ways = sorted(f'{a} <-> {b}' for a in units for b in units[a] if a < b and a in units.get(b, ()))
    assert both_ways == []


def test_functions_are_short():
    long_functions = []
    for name, path in modules().items():
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], 'value', None), ast.Constant):
                    body = body[1:] or body
                length = body[-1].end_lineno - body[0].lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f'{name}.{node.name}: {length} lines')
    assert long_functions == []
