"""The house's layers (docs/DESIGN.md): imports go down only, none forms a cycle, nothing but the
entry points imports the trainer, and kernels/ knows nothing of osrt_fast. Every import counts,
those inside functions too."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Layer of each osrt_fast module, bottom = 0. A module may import its own layer and those below.
LAYERS = {
    0: ["config", "cameras", "metrics", "drawing", "version", "guards", "schedule", "signals",
        "runs", "progress", "files", "locks", "errors", "recompute", "process"],
    1: ["data", "scenes"],           # data: the package and all its modules
    2: ["model"],
    3: ["parallel", "checkpoint", "throughput", "evaluate", "rendering", "slots"],
    4: ["trainer", "encode", "view", "render"],
}
ENTRY_POINTS = ("train.py", "render.py")


def modules(package: str) -> dict:
    """module name -> file, for every .py under ROOT/package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports(name: str, path: str, known: set) -> set:
    """The modules of `known` that `name` imports anywhere in its file."""
    is_package = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - (node.level - (1 if is_package else 0))]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import mod` imports pkg.mod (pkg itself only for names that are not modules)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else subs + [base]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def layer_of(name: str) -> int:
    short = name.split(".")[1] if "." in name else ""
    return next(rank for rank, names in LAYERS.items() if short in names)


def graph() -> dict:
    mods = modules("osrt_fast")
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items() if name != "osrt_fast"}


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)          # StopIteration names a module missing from LAYERS


def test_imports_go_down_only():
    bad = [(a, b) for a, targets in graph().items() for b in targets
           if b != "osrt_fast" and layer_of(b) > layer_of(a)]
    assert not bad, f"upward imports (module -> module of a higher layer): {bad}"


def test_no_import_cycle():
    g = graph()
    # A module's CLI may use its own package's facade (data.shards -> data.get_dataset), which
    # imports that module back: not counted. Every other edge is.
    g = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in g.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in g.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in g:
        if node not in state:
            visit(node, [node])


def test_only_entry_points_import_the_trainer():
    users = [a for a, targets in graph().items() if "osrt_fast.trainer" in targets]
    assert not users, f"library modules importing the trainer: {users}"
    for name in ENTRY_POINTS:
        assert os.path.exists(os.path.join(ROOT, name))


def test_kernels_know_nothing_of_osrt_fast():
    known = set(modules("osrt_fast")) | set(modules("kernels"))
    for name, path in modules("kernels").items():
        assert not [t for t in imports(name, path, known) if t.startswith("osrt_fast")], name


def test_the_kernels_are_imported_by_their_installed_name_only():
    """kernels/ installs as osrt_fast.kernels (pyproject's package-dir): an import of a top-level
    `kernels` works in a clone but not in an install, and would register the kernels' custom ops
    twice beside osrt_fast.kernels."""
    bad = []
    for package in ("osrt_fast", "kernels", "tests", "benchmarks"):
        for name, path in modules(package).items():
            for node in ast.walk(ast.parse(open(path).read())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                         else [])
                bad += [(name, n) for n in names if n == "kernels" or n.startswith("kernels.")]
    assert not bad, f"imports of a top-level kernels package: {bad}"
