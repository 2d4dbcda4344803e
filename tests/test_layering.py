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


def _import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the modules it imports (``modules``: name -> file; default: every module of the three folders)."""
    modules = modules or {_module_name(p, folder): p for folder in PACKAGES for p in _files(folder)}
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


# ------------------------------------------------------------------------------------------------ one loop
# The modules that may hold the trainer itself: the trainer, the library's entry points and the command line.
KNOWS_THE_TRAINER = {"critic_align.trainer", "critic_align.api", "critic_align.train.cli"}
TRAINER_MAX_LINES = 250


def _modules() -> dict[str, Path]:
    """Every module of critic_align/, steering/ and train/ once (the critic_align/steering and critic_align/train links
    are not followed: their folders are scanned as themselves)."""
    return {_module_name(p, folder): p for folder in PACKAGES for p in _files(folder)}


def trainer_leaks(modules: dict[str, Path]) -> list[str]:
    """Where a module other than :data:`KNOWS_THE_TRAINER` takes the trainer: a function (or lambda) parameter named
    ``trainer``, an import of ``Trainer`` or of ``critic_align.trainer`` (absolute or relative), or a read of a private
    attribute of something named ``trainer``."""
    graph = _import_graph(modules)
    found = []
    for name, path in modules.items():
        if name in KNOWS_THE_TRAINER:
            continue
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if "critic_align.trainer" in graph[name]:
            found.append(f"{where}: imports critic_align.trainer")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p is not None]
                if any(p.arg == "trainer" for p in params):
                    found.append(f"{where}:{node.lineno}: {getattr(node, 'name', 'lambda')}() takes a trainer")
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and any(a.name.split(".")[-1] == "Trainer"
                                                                        for a in node.names):
                found.append(f"{where}:{node.lineno}: imports Trainer")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trainer"
                  and node.attr.startswith("_")):
                found.append(f"{where}:{node.lineno}: reads trainer.{node.attr}")
    return found


def test_only_the_trainer_and_the_entry_points_know_the_trainer():
    modules = _modules()
    assert {"critic_align.trainer", "critic_align.api", "critic_align.train.cli", "critic_align.train.steer",
            "critic_align.steering.particles", "critic_align.runio"} <= set(modules)  # every folder is seen
    assert trainer_leaks(modules) == []


def test_the_leak_check_finds_each_kind_of_leak(tmp_path):
    """The check fails on a planted module with a violation of each kind (parameters, the imports, a private read),
    and not on the same code as an exempt module."""
    planted = tmp_path / "planted.py"
    planted.write_text("from .trainer import Trainer\n"
                       "from critic_align import trainer as t\n\n\n"
                       "def save_everything(trainer, path):\n"
                       "    return trainer._secret\n\n\n"
                       "def keyword_only(*, trainer=None):\n"
                       "    return trainer\n\n\n"
                       "later = lambda trainer: trainer\n")
    modules = _modules()
    leaks = trainer_leaks({**modules, "critic_align.planted": planted})
    assert len(leaks) == 6 and all(x.startswith(str(planted)) for x in leaks), leaks
    assert any("imports critic_align.trainer" in x for x in leaks)  # the module, absolute or relative
    assert any("save_everything() takes a trainer" in x for x in leaks)
    assert any("keyword_only() takes a trainer" in x for x in leaks)
    assert any("lambda() takes a trainer" in x for x in leaks)
    assert any("imports Trainer" in x for x in leaks)
    assert any("reads trainer._secret" in x for x in leaks)
    assert trainer_leaks({**modules, "critic_align.api": planted}) == []


def test_the_trainer_module_stays_short():
    """One loop that reads top to bottom: trainer.py holds the state and the loop, the stages live elsewhere."""
    lines = len((ROOT / "critic_align" / "trainer.py").read_text().splitlines())
    assert lines < TRAINER_MAX_LINES, f"critic_align/trainer.py has {lines} lines: move a helper into its stage module"


# ------------------------------------------------------------------------------------------------ research flags
# The research flags' config names and the modules that may read them: the config (which checks them), the one module
# each flag lives in, and the entry points (the library's api and the command line, which set and report them).  The
# rest of the library reaches them through their module's record (x0_reward.X0Readout, sde_window.Window).
FLAG_HOMES = {"critic_x0_reward": "critic_align.x0_reward", "sde_window_size": "critic_align.sde_window",
              "sde_window_range": "critic_align.sde_window"}
READ_FLAGS_ANYWHERE = {"critic_align.config", "critic_align.api"}  # and the command line, critic_align.train.*


def flag_reads(modules: dict[str, Path]) -> list[str]:
    """Where a module other than a flag's home, :data:`READ_FLAGS_ANYWHERE` and the command line reads one of
    :data:`FLAG_HOMES`: as an attribute (``cfg.critic_x0_reward``), through ``getattr(cfg, "critic_x0_reward")`` or
    as a string key (``d["sde_window_size"]``).  A docstring or an error message naming the option is not a read."""
    found = []
    for name, path in modules.items():
        if name in READ_FLAGS_ANYWHERE or name == "critic_align.train" or name.startswith("critic_align.train."):
            continue
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for node in ast.walk(ast.parse(path.read_text())):
            read = None
            if isinstance(node, ast.Attribute):
                read = node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                read = node.args[1].value
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                read = node.slice.value
            if read in FLAG_HOMES and FLAG_HOMES[read] != name:
                found.append(f"{where}:{node.lineno}: reads {read}")
    return found


def test_the_research_flags_are_read_only_in_their_modules():
    modules = _modules()
    assert set(FLAG_HOMES.values()) | READ_FLAGS_ANYWHERE <= set(modules)
    assert flag_reads(modules) == []
    # the rule is not vacuous: the homes do read their flags (moved elsewhere, they would be caught)
    homes = {f"{m}.elsewhere": p for m, p in modules.items() if m in set(FLAG_HOMES.values())}
    assert {x.split(": reads ")[1] for x in flag_reads(homes)} == set(FLAG_HOMES)


def test_the_flag_check_finds_each_kind_of_read(tmp_path):
    """A planted module reading the flags as an attribute, through getattr and as a key is caught, line by line;
    the same code as a flag's home, as the config or as the command line is not (for the flag that lives there)."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f(cfg, d):\n"
                       "    a = cfg.critic_x0_reward\n"
                       "    b = getattr(cfg, 'sde_window_size', 0)\n"
                       "    c = d['sde_window_range']\n"
                       "    '''critic_x0_reward: a docstring naming it is no read'''\n"
                       "    raise ValueError('set sde_window_size: 0')\n")
    leaks = flag_reads({"critic_align.planted": planted})
    assert leaks == [f"{planted}:2: reads critic_x0_reward", f"{planted}:3: reads sde_window_size",
                     f"{planted}:4: reads sde_window_range"], leaks
    assert flag_reads({"critic_align.config": planted}) == flag_reads({"critic_align.train.steer": planted}) == []
    assert flag_reads({"critic_align.sde_window": planted}) == [f"{planted}:2: reads critic_x0_reward"]
