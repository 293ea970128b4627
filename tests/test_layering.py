"""zsad's import drawing: no circles, and every module imports only modules declared below it.

The imports are read with ``ast`` from every module of the package, at module level and inside functions,
relative imports resolved. ``import a.b.c`` from outside package ``a.b`` runs ``a/b/__init__.py`` too, so
it counts as an import of ``a.b`` as well. Imports made by name at run time (``importlib.import_module`` on
a string, as the method registry does) are invisible to ``ast``: in a module that calls
``importlib.import_module``, every string constant that names a zsad module counts as an import, and the
declared order below is what places such targets.

``ORDER`` is the declaration: groups from the bottom up, and within a group, modules from the bottom up.
A module may import only modules earlier in ``ORDER``, which forbids circles by construction; a new module
must be placed here before its imports can be checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "zsad"

ORDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation: no zsad imports beyond this group",
        (
            "zsad",
            "zsad.outputs",
            "zsad.device",
            "zsad.metrics",
            "zsad.losses",
            "zsad.clip_forward",
            "zsad.report",
            "zsad.methods.heads",
            "zsad.methods.hsf",
        ),
    ),
    (
        "data: datasets, the feature cache, SynthAD, and the shipped model's files (zsad.tiny)",
        (
            "zsad.cache",
            "zsad.data.images",
            "zsad.data.meta",
            "zsad.data.dataset",
            "zsad.data.prepare",
            "zsad.data",
            "zsad.data.synth.catalogue",
            "zsad.data.synth.canvas",
            "zsad.data.synth.textures",
            "zsad.data.synth.objects",
            "zsad.data.synth.scene",
            "zsad.data.synth.defects",
            "zsad.data.synth.render",
            "zsad.data.synth.captions",
            "zsad.data.synth.writer",
            "zsad.data.synth.sheet",
            "zsad.data.synth",
            "zsad.tiny",
        ),
    ),
    (
        "model: the CLIP backbone and the prompts it encodes",
        ("zsad.backbone", "zsad.prompts", "zsad.prompt_analysis"),
    ),
    (
        "methods: the detector protocol, the methods, the registry that builds them by name",
        (
            "zsad.methods.base",
            "zsad.methods.memory_bank",
            "zsad.methods.local_cnn",
            "zsad.methods.clip_baseline",
            "zsad.methods.winclip",
            "zsad.methods.aprilgan",
            "zsad.methods.clipad_sdp",
            "zsad.methods.clipad_sdp_plus",
            "zsad.methods.anomalyclip",
            "zsad.methods.adaclip",
            "zsad.methods.mfpclip",
            "zsad.methods.registry",
            "zsad.methods.official",
            "zsad.methods",
        ),
    ),
    (
        "procedures: evaluation, training, inference, export, reports and plans",
        (
            "zsad.evaluate",
            "zsad.thresholds",
            "zsad.viz",
            "zsad.index",
            "zsad.train",
            "zsad.export",
            "zsad.predict",
            "zsad.runs",
            "zsad.executors",
            "zsad.plans",
            "zsad.tiny.train",
            "zsad.tiny.measure",
        ),
    ),
    ("entry points", ("zsad.cli", "zsad.__main__", "zsad.tiny.__main__")),
)


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's ``__init__``) for every ``.py`` file of the package."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _named(target: str, modules: set[str]) -> str | None:
    """The module a dotted import target lands in (``a.b.name`` -> ``a.b`` when ``name`` is an attribute)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _targets(tree: ast.Module, package: str) -> list[str]:
    """Every dotted name the module imports, relative imports resolved against ``package``."""
    found: list[str] = []
    uses_importlib = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found += [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in base
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            uses_importlib = True
    if uses_importlib:
        strings = [
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        found += [s.split(":")[0] for s in strings if s.startswith("zsad.") and " " not in s]
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the zsad modules it imports (module level and inside functions)."""
    files = module_files(package_dir)
    names = set(files)
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in files.items():
        package = module if is_package else module.rpartition(".")[0]
        edges: set[str] = set()
        for target in _targets(ast.parse(path.read_text(encoding="utf-8")), package):
            landed = _named(target, names)
            if landed is None:
                continue
            edges.add(landed)
            # Importing a.b.c from outside a.b runs a.b's __init__ first; from inside it, a.b is already
            # being imported (it is the importer's own package), so that adds nothing.
            parent = landed.rpartition(".")[0]
            while parent and not f"{module}.".startswith(f"{parent}."):
                edges.add(parent)
                parent = parent.rpartition(".")[0]
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def upward_imports(graph: dict[str, set[str]], order: list[str]) -> list[str]:
    """``importer -> imported`` for every import of a module declared at or above the importer."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if module in rank and target in rank and rank[target] >= rank[module]
    )


DECLARED = [name for _, group in ORDER for name in group]


def test_every_module_is_declared_once():
    assert len(DECLARED) == len(set(DECLARED)), "a module is declared twice"
    actual = set(module_files())
    assert not actual - set(DECLARED), f"modules missing from ORDER: {sorted(actual - set(DECLARED))}"
    assert not set(DECLARED) - actual, (
        f"ORDER names modules that do not exist: {sorted(set(DECLARED) - actual)}"
    )


@pytest.fixture(scope="module")
def zsad_graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_circle(zsad_graph):
    cycle = find_cycle(zsad_graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_every_import_goes_down_the_declared_order(zsad_graph):
    assert upward_imports(zsad_graph, DECLARED) == []


def test_the_checks_see_what_they_must(tmp_path):
    """The walk finds function-level, relative and by-name imports and the checks turn red on them."""
    pkg = tmp_path / "zsad"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from zsad import high\n")  # function level, circle
    (pkg / "high.py").write_text("from zsad.low import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\nfrom ..low import f\n")  # relative imports
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "reg.py").write_text(
        "import importlib\nimportlib.import_module('zsad.sub.b')\nX = 'zsad.high:Y'\n"
    )
    graph = import_graph(pkg)
    assert graph["zsad.low"] == {"zsad.high"} and graph["zsad.high"] == {"zsad.low"}
    assert graph["zsad.sub.a"] == {"zsad.sub.b", "zsad.low"}
    assert graph["zsad.reg"] == {"zsad.sub.b", "zsad.sub", "zsad.high"}  # the parent package runs too
    assert find_cycle(graph) in (
        ["zsad.high", "zsad.low", "zsad.high"],
        ["zsad.low", "zsad.high", "zsad.low"],
    )
    order = ["zsad", "zsad.sub.b", "zsad.sub", "zsad.low", "zsad.sub.a", "zsad.high", "zsad.reg"]
    assert upward_imports(graph, order) == ["zsad.low -> zsad.high"]
    del graph["zsad.low"]
    assert find_cycle(graph) is None
