"""The package's import graph: no circles, a Flower- and Hydra-free core, no module grown past
about 800 lines unnoticed.

The graph is read from the source with :mod:`ast` (nothing is imported): every ``import`` and
``from ... import`` of a project module, at module level and inside functions, relative and
absolute; imports under ``if TYPE_CHECKING:`` are left out (they never run). An import of a
module also runs its package's ``__init__``; that implicit edge is not counted (Python
initialises the package first, so it cannot close a circle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PACKAGE = "flwr_distreal"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: The layers, lowest first. A module may import modules of its own layer and of lower ranks,
#: never of a higher rank or of another layer of the same rank (``training`` does not import
#: ``server``). The folder is the layer: ``flwr_distreal/<layer>/...``; ``dse/__main__`` (the DSE
#: command) is a command like ``cli``; the package itself and its top-level modules (the public
#: import paths kept for users: ``flwr_distreal.serverapp``, ``.clientapp``, ``.loop``,
#: ``.resources``, ``.main``, ``.tune``, ``.report``) are the façade above everything.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("data", "models"),
    ("training", "server", "dse"),
    ("methods",),
    ("flower",),
    ("run",),
    ("cli",),
    ("api",),
]
RANK = {layer: rank for rank, names in enumerate(LAYERS) for layer in names}

#: Layers that must import neither Flower (``flwr``) nor Hydra (``hydra``), directly or through
#: another project module. (``flwr_datasets``, an optional loader of ``data/femnist.py``, is its
#: own package, not Flower's framework.)
CORE = ["core", "data", "models", "training", "server", "methods", "dse.problem", "dse.fitness", "dse.driver"]
FORBIDDEN = ("flwr", "hydra")

#: The most lines a module may have, and the modules allowed over it for now (this list only
#: shrinks: a listed module that is split below the limit must leave it).
MAX_LINES = 800
OVERSIZE: set[str] = set()


def layer_of(module: str) -> str:
    """The layer of a project module: its first folder under the package (see :data:`LAYERS`)."""
    parts = module.split(".")[1:]
    if parts[:2] == ["dse", "__main__"]:
        return "cli"
    if len(parts) >= 2 or (parts and parts[0] in RANK and parts[0] != "api"):
        return parts[0]
    return "api"  # the package's __init__ and the top-level public paths


def wrong_direction(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up a layer or sideways into another layer of the same rank."""
    bad = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if there != here and RANK[there] >= RANK[here]:
                bad.append(f"{module} ({here}) imports {target} ({there})")
    return bad


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom of ``tree`` (any depth), except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)  # the else branch does run
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """The project modules and the top-level external packages that module ``name`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal: set[str] = set()
    external: set[str] = set()

    def add(target: str) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            while target not in known and "." in target:  # an attribute of a module: the module
                target = target.rpartition(".")[0]
            internal.add(target)
        else:
            external.add(target.split(".")[0])

    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        for alias in node.names:  # from x import submodule
            if f"{target}.{alias.name}" in known:
                add(f"{target}.{alias.name}")
            else:
                add(target)
    internal.discard(name)
    return internal, external


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Project module -> the project modules it imports; project module -> external packages."""
    modules = _modules()
    known = set(modules)
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = imports_of(name, path, known)
    return graph, external


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not: module -> the module that imports it."""
    seen: dict[str, str] = {}
    stack = [start]
    while stack:
        node = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen and nxt != start:
                seen[nxt] = node
                stack.append(nxt)
    return seen


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    """The reader finds module-level, in-function, ``from . import x`` and two-level relative
    imports, and leaves out ``TYPE_CHECKING`` ones: a reader that saw nothing would pass the rest."""
    internal, external = graph
    assert {"flwr_distreal.run.flwr_app", "flwr_distreal.run.experiment"} <= internal["flwr_distreal.run.runtimes"]
    assert "flwr_distreal.run.runtimes" in internal["flwr_distreal.cli.main"]  # in-function
    assert "flwr_distreal.flower.serverapp" in internal["flwr_distreal.run.experiment"]  # from . import serverapp
    assert "flwr_distreal.core.lut" in internal["flwr_distreal.dse.driver"]  # from ..lut import LUT
    assert "flwr_distreal.run.experiment" not in internal["flwr_distreal.run.recording"]  # TYPE_CHECKING only
    assert "matplotlib" in external["flwr_distreal.run.plotting"] and "flwr" in external["flwr_distreal.run.flwr_app"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_go_down_the_layers(graph):
    """core <- data, models <- training, server, dse <- methods <- flower <- run <- cli <- the
    public paths: no import goes up, none sideways between layers of one rank."""
    assert wrong_direction(graph[0]) == []


def test_the_direction_check_catches_a_wrong_import(graph):
    """The check is not blind: an upward and a sideways import, added to the real graph, fail."""
    internal = {m: set(t) for m, t in graph[0].items()}
    internal["flwr_distreal.core.lut"].add("flwr_distreal.flower.serverapp")  # core -> flower: up
    internal["flwr_distreal.training.loop"].add("flwr_distreal.server.aggregate")  # same rank, sideways
    bad = wrong_direction(internal)
    assert bad == [
        "flwr_distreal.core.lut (core) imports flwr_distreal.flower.serverapp (flower)",
        "flwr_distreal.training.loop (training) imports flwr_distreal.server.aggregate (server)",
    ]
    assert layer_of("flwr_distreal.serverapp") == "api" and layer_of("flwr_distreal") == "api"
    assert layer_of("flwr_distreal.dse.__main__") == "cli" and layer_of("flwr_distreal.data") == "data"


def test_every_module_sits_in_a_layer():
    """A new top-level module is a public path (the façade) or belongs in a layer folder."""
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert top == {"serverapp", "clientapp", "loop", "resources", "main", "tune", "report"}
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(RANK), folders - set(RANK)


def test_no_import_circles(graph):
    cycle = find_cycle(graph[0])
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("core", CORE)
def test_core_imports_neither_flower_nor_hydra(graph, core):
    internal, external = graph
    start = f"{PACKAGE}.{core}"
    modules = [start, *[m for m in internal if m.startswith(start + ".")]]  # a package: all its modules
    bad = []
    for module in modules:
        via = reachable(internal, module)
        for reached in [module, *via]:
            for package in FORBIDDEN:
                if package in external[reached]:
                    chain, node = [reached], reached
                    while node != module:
                        node = via[node]
                        chain.append(node)
                    bad.append(f"{' <- '.join(chain)} imports {package}")
    assert not bad, "\n".join(bad)


def test_module_sizes():
    sizes = {name.removeprefix(PACKAGE + "."): len(path.read_text(encoding="utf-8").splitlines())
             for name, path in _modules().items()}
    over = {name for name, lines in sizes.items() if lines > MAX_LINES}
    assert not over - OVERSIZE, (
        f"over {MAX_LINES} lines: {sorted((n, sizes[n]) for n in over - OVERSIZE)}; split by concern "
        "(or, if there is a reason, add it to OVERSIZE with that reason)"
    )
    assert not OVERSIZE - over, (
        f"now at most {MAX_LINES} lines: {sorted((n, sizes.get(n)) for n in OVERSIZE - over)}; take them off "
        "OVERSIZE so that it stays the list of the modules still to split"
    )


def _function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every import inside a function of ``path`` (any depth)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom):
                    out.append((node.lineno, "." * node.level + (node.module or "")))
                elif isinstance(node, ast.Import):
                    out += [(node.lineno, alias.name) for alias in node.names]
    return out


#: Third-party packages a function may import where it needs them: optional dependencies
#: (torchvision, scikit-learn, flwr-datasets, rich, cryptography, httpx) and the heavy ones a
#: command imports only on the path that uses them (matplotlib for plots, Hydra and Flower in the
#: runner and the deployment tools, PyYAML and OmegaConf in the report tools).
OPTIONAL_IMPORTS = {
    "torchvision", "sklearn", "flwr_datasets", "rich", "cryptography", "httpx", "matplotlib", "hydra", "flwr",
    "yaml", "omegaconf",
}


#: The project imports a command defers on purpose, each with its reason (the module and the target):
#: the runner and the tuner answer a refused config without loading Flower and torch (the runtimes
#: load them), and the Hydra callback module, which the logging config instantiates, loads the
#: report (torch, through the methods) only when a sweep ends.
DEFERRED = {
    ("cli/main.py", "..run.runtimes"),
    ("cli/tune.py", "..run"),
    ("cli/callbacks.py", ".report"),
    # The runner of flwr-run waits beside the run's processes for the whole run and never loads
    # torch (run/flwr_runner.py): the config schemas, the method registry, the start-up checks
    # and the recording helpers it imports defer torch to the one function that needs it.
    ("cli/main.py", "..run.flwr_runner"),
    ("core/contract.py", "torch"),  # decode_subsets, on a client
    ("core/resources/sizing.py", "..dropout"),  # size_resources given a model
    ("core/resources/sizing.py", "..macs"),
    ("methods/base.py", "..models"),  # the submodel core, on the server
    ("run/checks.py", "torch"),  # device=cuda..., GPUs per client
    ("training/recipe.py", "torch"),  # resolve_device
}


def test_imports_inside_functions_are_only_optional_dependencies():
    """A project module is imported at the top of a module, never inside a function (which would
    hide an edge of the import graph), but for the commands' :data:`DEFERRED` imports; inside
    functions only :data:`OPTIONAL_IMPORTS`."""
    bad = []
    for path in _modules().values():
        where = path.relative_to(ROOT).as_posix()
        for line, target in _function_imports(path):
            if (where, target) in DEFERRED:
                continue
            if target.startswith(".") or target.split(".")[0] not in OPTIONAL_IMPORTS:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_importing_the_package_loads_neither_torch_nor_flower():
    """``import flwr_distreal`` (and finding the app's module, as the ``flwr`` CLI does when it
    builds the FAB) stays a bare interpreter; every public name still resolves on use."""
    code = (
        "import importlib.util, sys\n"
        "import flwr_distreal, flwr_distreal.run\n"
        "assert importlib.util.find_spec('flwr_distreal.run.flwr_app') is not None\n"
        "heavy = sorted(m for m in ('torch', 'flwr', 'hydra', 'numpy') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
        "missing = [n for n in flwr_distreal.__all__ if getattr(flwr_distreal, n, None) is None]\n"
        "print('missing:', missing)\n"
        "assert sorted(flwr_distreal.__all__) == sorted(flwr_distreal._LAZY)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "heavy: []" in result.stdout, result.stdout
    assert "missing: []" in result.stdout, result.stdout



def test_the_flwr_run_runner_loads_neither_torch_nor_flower():
    """The runner of ``runtime=flwr-run`` waits beside the run's processes for the whole run:
    composing a config with every method's schema, the start-up checks, staging the app and its
    run loop import neither torch nor Flower (the experiment is checked in the preflight process)."""
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from flwr_distreal.cli import main as cli\n"
        "from flwr_distreal.run import flwr_runner\n"
        "from flwr_distreal.run.checks import check_run_start\n"
        "from flwr_distreal.run.config import to_run_config\n"
        "from flwr_distreal.run.resolvers import CONF_DIR\n"
        "from flwr_distreal.methods import get_method, list_methods\n"
        "for name in list_methods():\n"
        "    with initialize_config_dir(config_dir=str(CONF_DIR), version_base='1.3'):\n"
        "        cfg = to_run_config(compose(config_name='config', overrides=[f'strategy={name}']))\n"
        "    check_run_start(cfg, sys.argv[1])\n"
        "    get_method(name).schema\n"
        "flwr_runner.stage_app(sys.argv[1] + '/app')\n"
        "print('heavy:', sorted(m for m in ('torch', 'flwr', 'ray') if m in sys.modules))\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "heavy: []" in result.stdout, result.stdout


def test_lazy_names_match_their_modules():
    """The packages that export a torch module's names lazily list exactly that module's names."""
    from flwr_distreal import server, training
    from flwr_distreal.methods import fedrolex, fjord
    from flwr_distreal.methods import _fedrolex, _fjord
    from flwr_distreal.server import submodels
    from flwr_distreal.training import trainers

    assert sorted(server._SUBMODELS) == sorted(submodels.__all__)
    assert sorted(training.__all__) == sorted(trainers.__all__)
    assert sorted(fjord._TORCH_SIDE) == sorted(_fjord.__all__) and set(_fjord.__all__) <= set(fjord.__all__)
    assert _fedrolex.__all__ == ["FedRolexPlanner"] and fedrolex.FedRolexPlanner is _fedrolex.FedRolexPlanner
    assert fjord.OrderedDropoutTrainer is _fjord.OrderedDropoutTrainer
