"""The package's module-level imports form no cycle.

The graph is built with ast over megaloop/**/*.py (no import is executed): an edge A -> B for every
`import B` / `from B import x` that runs when A is imported (module level, class bodies, module-level
if/try blocks; not function bodies and not `if TYPE_CHECKING:` blocks). `from pkg import name` counts
pkg.name when that is a module, else pkg. A cycle means two modules need each other to be importable:
their order of import decides whether it works, and the concepts they hold have no one home.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megaloop"


def _modules():
    mods = {}
    for f in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = f.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (f, is_pkg)
    return mods


def _is_type_checking(test) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_nodes(body):
    """Statements that run on import: recurse into if/try/with/class bodies, not into functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time_nodes(node.body)
            yield from _import_time_nodes(node.orelse)
            continue
        if isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _import_time_nodes(block)
            continue
        if isinstance(node, (ast.With, ast.ClassDef)):
            yield from _import_time_nodes(node.body)
            continue
        yield node


def import_graph(lazy: bool = False):
    """{module: the megaloop modules it imports}; lazy=True also counts imports inside functions."""
    mods = _modules()
    graph = {}
    for name, (f, is_pkg) in mods.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in (ast.walk(tree) if lazy else _import_time_nodes(tree.body)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                # `from pkg import sub` needs the submodule (its package is a parent, imported first
                # anyway); `from mod import name` needs mod
                subs = [f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in mods]
                targets = subs + ([src] if len(subs) < len(node.names) else [])
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan), each as one cycle through it."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:
        members = set(comp)
        # one concrete cycle: walk from the first member inside the component back to it (BFS)
        start = comp[0]
        prev, frontier, path = {start: None}, [start], None
        while frontier and path is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        path = [v]
                        while prev[path[-1]] is not None:
                            path.append(prev[path[-1]])
                        path = path[::-1] + [start]
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if path:
                    break
            frontier = nxt
        out.append((comp, path))
    return out


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "megaloop.checkpoint.reader" in graph and "megaloop.parallel.pipeline" in graph
    assert "megaloop.checkpoint.layout" in graph["megaloop.checkpoint.reader"]
    assert "megaloop.model.looped_lm" in graph["megaloop.parallel.pipeline"]
    # a function-level (lazy) import is no edge
    assert "megaloop.parallel.pipeline" not in graph["megaloop.checkpoint.reader"]
    # the cycle finder finds a cycle
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [(["a", "b", "c"], ["a", "b", "c", "a"])]


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join(
        " -> ".join(path or comp) for comp, path in cycles)


def test_export_reads_checkpoints_never_the_reverse():
    graph = import_graph(lazy=True)  # function-level imports too
    assert "megaloop.checkpoint" in graph["megaloop.export.inputs"]
    for mod, deps in graph.items():
        if mod.startswith("megaloop.checkpoint"):
            bad = sorted(d for d in deps
                         if d.startswith(("megaloop.export", "megaloop.training", "megaloop.generation",
                                          "megaloop.hf_import")))
            assert not bad, f"{mod} imports {bad}"


def test_hf_import_builds_on_checkpoint_and_model_never_the_reverse():
    graph = import_graph(lazy=True)
    assert "megaloop.checkpoint.plain" in graph["megaloop.hf_import"]
    for mod, deps in graph.items():
        if mod.startswith(("megaloop.checkpoint", "megaloop.model", "megaloop.training", "megaloop.export")):
            bad = sorted(d for d in deps if d.startswith("megaloop.hf_import"))
            assert not bad, f"{mod} imports {bad}"
