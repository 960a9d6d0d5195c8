"""The shape of the house (docs/architecture.md): imports point down the layers, and no file or package imports
itself back through others. Every import statement counts, including those inside functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "offgridd"

# The layers, top first; a module may import its own layer and those below. The longest matching prefix decides.
LAYERS = {
    "entry": ["offgridd.__main__", "offgridd.cli", "offgridd.daemon", "offgridd.doctor"],
    "http": ["offgridd.web", "offgridd.upstreams", "offgridd.api", "offgridd.ui", "offgridd.usb.routes",
             "offgridd.peers.http", "offgridd.peers.routing", "offgridd.peers.routes", "offgridd.history.routes",
             "offgridd.voice.routes", "offgridd.documents.routes"],
    "appliance": ["offgridd.runtime", "offgridd.status"],
    "subsystem": ["offgridd.inference", "offgridd.hardware", "offgridd.usb", "offgridd.peers", "offgridd.history",
                  "offgridd.voice", "offgridd.documents"],
    "foundation": ["offgridd", "offgridd.store", "offgridd.settings", "offgridd.events", "offgridd.db",
                   "offgridd.jobs", "offgridd.metrics", "offgridd.logs", "offgridd.notify", "offgridd.engine_build",
                   "offgridd.keys", "offgridd.audit"],
}
ORDER = list(LAYERS)  # top first


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The offgridd modules `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import sub` imports the module pkg.sub where there is one
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def layer_of(name: str) -> str:
    best, layer = -1, None
    for candidate, prefixes in LAYERS.items():
        for prefix in prefixes:
            within = name.startswith(prefix + ".") and prefix != "offgridd"  # the package root is one module
            if (name == prefix or within) and len(prefix) > best:
                best, layer = len(prefix), candidate
    return layer


def unit_of(name: str) -> str:
    """What a package-level cycle is counted between: offgridd's top-level packages and modules."""
    return ".".join(name.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer(graph):
    assert [name for name in graph if layer_of(name) is None] == [], "place new modules in LAYERS and the docs"


def test_imports_point_down(graph):
    upward = [f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, targets in sorted(graph.items())
              for b in sorted(targets) if ORDER.index(layer_of(b)) < ORDER.index(layer_of(a))]
    assert upward == []


def test_no_subsystem_imports_the_http_api(graph):
    below_http = [a for a in graph if ORDER.index(layer_of(a)) > ORDER.index("http")]
    assert [f"{a} imports {b}" for a in below_http for b in graph[a] if b.startswith("offgridd.api")] == []


def test_no_cycles_between_files(graph):
    assert cycles(graph) == []


def test_no_cycles_between_packages(graph):
    units: dict[str, set[str]] = {}
    for a, targets in graph.items():
        units.setdefault(unit_of(a), set()).update(unit_of(b) for b in targets if unit_of(b) != unit_of(a))
    assert cycles(units) == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: a made-up graph with both faults is caught."""
    made_up = {"offgridd.usb.watcher": {"offgridd.api.app"}, "offgridd.api.app": {"offgridd.usb.watcher"}}
    assert cycles(made_up) == [["offgridd.api.app", "offgridd.usb.watcher"]]
    assert ORDER.index(layer_of("offgridd.api.app")) < ORDER.index(layer_of("offgridd.usb.watcher"))


def test_other_packages_use_the_store_s_public_names(graph):
    inside = [f"{a} imports {b}" for a, targets in graph.items() for b in targets
              if b.startswith("offgridd.store.") and not a.startswith("offgridd.store")]
    assert inside == [], "import offgridd.store's names (its __init__), not its modules"
