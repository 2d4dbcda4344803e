"""Layering: nothing in the library (critic_align/ with critic_align.steering) imports critic_align.train (the CLI),
no two modules import each other, directly or around a longer loop (imports inside functions count: they are circles
deferred, not removed), the installed distribution has one top-level package, and no stage module takes the trainer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the module prefix it installs as (steering/ and train/ are critic_align.steering / .train)
PACKAGES = {"critic_align": "critic_align", "steering": "critic_align.steering", "train": "critic_align.train"}


def _module_name(path: Path, folder: str) -> str:
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    parts = PACKAGES[folder].split(".") + parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files(folder: str):
    """The .py files of a repository folder, not through the links to the other folders."""
    for p in sorted((ROOT / folder).rglob("*.py")):
        if any((ROOT / folder / other).is_symlink() and (ROOT / folder / other) in p.parents for other in PACKAGES):
            continue
        yield p


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p, folder): p for folder in PACKAGES for p in _files(folder)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # a name inside a module -> the module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def test_the_library_does_not_import_train():
    graph = _import_graph()
    cli = "critic_align.train"
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if not m.startswith(cli) for t in ts
                 if t == cli or t.startswith(cli + "."))
    assert bad == []
    assert "critic_align.steering.particles" in graph and "critic_align.train.cli" in graph  # the folders are seen


def test_one_installed_namespace():
    """The installed distribution's top-level packages are exactly critic_align; steering/ and train/ stay folders."""
    from importlib.metadata import distribution

    top = distribution("critic-align").read_text("top_level.txt")
    assert top is not None and top.split() == ["critic_align"]
    assert (ROOT / "steering").is_dir() and (ROOT / "train").is_dir()
    import critic_align.steering
    import critic_align.train.cli

    assert Path(critic_align.train.cli.__file__).resolve() == (ROOT / "train" / "cli.py").resolve()
    assert Path(critic_align.steering.__file__).resolve().parent == (ROOT / "steering").resolve()


def test_no_import_circles():
    graph = _import_graph()
    # a package's __init__ re-exporting its submodules is not a circle with them
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and graph.get(t) and m in graph[t])} for m, ts in graph.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []
