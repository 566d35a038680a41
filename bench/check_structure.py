"""Structure check of the `cmg_core` package: `python bench/check_structure.py` prints each problem and exits 1,
or exits 0 when there is none. tests/test_structure.py runs the same checks (so CI does).

Checks:
  cycles   - no import circle among cmg_core modules. Every `import` / `from ... import` in a file counts, the
             ones inside functions too (a function-level import only hides a circle, it does not break it), and
             so do the lazy string imports of LAZY_MAPS. `from pkg import name` is an import of `pkg.name` when
             that is a module, else of `pkg`. Importing `a.b.c` runs the `__init__` of `a` and `a.b` first; that
             implicit step is not an edge (a package re-exporting its submodules is normal), only what a file
             names is: `from . import x` is an edge to the submodule x, while `from cmg_core.data import name`
             inside cmg_core/data/ is an edge to the package's `__init__` and closes a circle when that
             `__init__` imports the submodule.
  orphans  - every cmg_core module is imported by some other module of cmg_core/, app/, pages/ or bench/ (tests
             do not count), except entry points: package `__init__`s, cmg_core/cli.py, cmg_core/__main__.py and
             the modules named by pyproject.toml's scripts / entry points.
  lazy     - every lazy string import of LAZY_MAPS names an existing module that defines the named attribute
             (cmg_core/__init__.py's `_EXPORTS`, cmg_core/data/registry.py's `DATASETS`).

`--root DIR` checks another checkout (a folder holding cmg_core/ and optionally app/, pages/, bench/,
pyproject.toml).
"""
from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cmg_core"
CALLER_FOLDERS = ("cmg_core", "app", "pages", "bench")  # where a module's callers may live (not tests/)
ENTRY_POINTS = {"cmg_core.cli", "cmg_core.__main__"}  # plus package __init__s and pyproject.toml's entry points

# Imports by string: module -> (module-level dict, package its strings are relative to, where in a value the
# module name is, where the attribute name is (None: the dict's key)). The dict must exist: a renamed one fails
# the check instead of silently dropping edges.
LAZY_MAPS = {
    "cmg_core": ("_EXPORTS", "cmg_core", None, None),            # "name": "module"
    "cmg_core.data.registry": ("DATASETS", "cmg_core.data", 0, 1),  # "name": ("module", "function", ...)
}


# ----------------------------------------------------------------------------------------------------- modules

def module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted name, is a package `__init__`) of a .py file under `root`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def python_files(root: Path, folder: str) -> list[Path]:
    base = root / folder
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Every module of `package`: dotted name -> (file, is a package `__init__`)."""
    out = {}
    for path in python_files(root, package):
        name, is_package = module_name(path, root)
        out[name] = (path, is_package)
    return out


def _resolve_base(name: str, is_package: bool, level: int, module: str | None) -> str | None:
    """The absolute module a `from <level dots><module> import ...` in module `name` starts from."""
    if level == 0:
        return module
    parts = name.split(".") if is_package else name.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        return None  # beyond the top-level package
    parts = parts[:len(parts) - (level - 1)]
    if module:
        parts.append(module)
    return ".".join(parts)


def _known(target: str, modules) -> str | None:
    """`target` if it is a module of `modules`, else its longest prefix that is (None when none is)."""
    parts = target.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _string_imports(tree: ast.Module, name: str, path: Path) -> tuple[list[tuple[str, str, int]], list[str]]:
    """The lazy imports of LAZY_MAPS in module `name`: ([(module, attribute, line)], problems)."""
    if name not in LAZY_MAPS:
        return [], []
    var, base, mod_at, attr_at = LAZY_MAPS[name]
    found, problems = [], []
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if not any(isinstance(t, ast.Name) and t.id == var for t in targets):
            continue
        if not isinstance(node.value, ast.Dict):
            problems.append(f"{path}:{node.lineno}: {var} is not a dict literal; the structure check cannot read "
                            f"its string imports (update LAZY_MAPS in bench/check_structure.py)")
            continue
        for key, value in zip(node.value.keys, node.value.values):
            mod = value if mod_at is None else (value.elts[mod_at] if isinstance(value, ast.Tuple) else None)
            attr = key if attr_at is None else (value.elts[attr_at] if isinstance(value, ast.Tuple) else None)
            if not (isinstance(mod, ast.Constant) and isinstance(mod.value, str)
                    and isinstance(attr, ast.Constant) and isinstance(attr.value, str)):
                problems.append(f"{path}:{value.lineno}: an entry of {var} is not a string literal")
                continue
            found.append((f"{base}.{mod.value}", attr.value, value.lineno))
    if not found and not problems:
        problems.append(f"{path}: no dict {var} at module level; the structure check reads its string imports "
                        f"(update LAZY_MAPS in bench/check_structure.py)")
    return found, problems


def file_imports(path: Path, name: str, is_package: bool, modules) -> list[tuple[str, int]]:
    """[(imported module of `modules`, line)] for every import anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, modules)
                if target:
                    out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_base(name, is_package, node.level, node.module)
            if base is None or base == "__future__":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _known(base, modules)
                if target:
                    out.append((target, node.lineno))
    lazy, _ = _string_imports(tree, name, path)
    out += [(mod, line) for mod, _, line in lazy if mod in modules]
    return out


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, list[int]]]:
    """module -> {imported module of the package: [lines]} (self-imports left out)."""
    modules = package_modules(root, package)
    graph: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    for name, (path, is_package) in modules.items():
        for target, line in file_imports(path, name, is_package, modules):
            if target != name:
                graph[name].setdefault(target, []).append(line)
    return graph


# ------------------------------------------------------------------------------------------------------ cycles

def strongly_connected(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node, each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _short_cycle(graph, component: list[str]) -> list[str]:
    """One shortest circle through the first module of `component` (breadth-first, inside the component)."""
    start, members = component[0], set(component)
    parents = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component  # pragma: no cover - a component always has a circle through each member


def check_cycles(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    graph = import_graph(root, package)
    modules = package_modules(root, package)
    problems = []
    for component in strongly_connected(graph):
        members = set(component)
        steps = [f"{a} -> {b} ({modules[a][0].relative_to(root)}:{','.join(map(str, sorted(set(lines))))})"
                 for a in component for b, lines in sorted(graph[a].items()) if b in members]
        problems.append(f"import circle among {', '.join(component)} (one circle: "
                        f"{' -> '.join(_short_cycle(graph, component))}); the imports inside it: " + "; ".join(steps))
    return problems


# ----------------------------------------------------------------------------------------------------- orphans

def entry_points(root: Path = ROOT) -> set[str]:
    """Modules named by pyproject.toml's [project.scripts], [project.gui-scripts] and [project.entry-points]."""
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return set()
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    specs = list(project.get("scripts", {}).values()) + list(project.get("gui-scripts", {}).values())
    for group in project.get("entry-points", {}).values():
        specs += list(group.values())
    return {spec.split(":")[0].strip() for spec in specs}


def callers(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Package module -> the other modules (of CALLER_FOLDERS, not tests) that import it."""
    modules = package_modules(root, package)
    out: dict[str, set[str]] = {m: set() for m in modules}
    for folder in CALLER_FOLDERS:
        for path in python_files(root, folder):
            name, is_package = module_name(path, root)
            for target, _ in file_imports(path, name, is_package, modules):
                if target != name:
                    out[target].add(name)
    return out


def check_orphans(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    modules = package_modules(root, package)
    exempt = {m for m in ENTRY_POINTS if m.startswith(package + ".")} | entry_points(root)
    problems = []
    for name, importers in sorted(callers(root, package).items()):
        path, is_package = modules[name]
        if importers or is_package or name in exempt:
            continue
        problems.append(f"{path.relative_to(root)}: module {name} is imported by nothing in "
                        f"{', '.join(f + '/' for f in CALLER_FOLDERS)} (only tests, or nothing) and is no entry point")
    return problems


# -------------------------------------------------------------------------------------------------------- lazy

def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def check_lazy(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    modules = package_modules(root, package)
    problems = []
    for name in LAZY_MAPS:
        if name not in modules:
            if name.split(".")[0] == package:
                problems.append(f"LAZY_MAPS names {name}, which is no module (update bench/check_structure.py)")
            continue
        path = modules[name][0]
        lazy, found_problems = _string_imports(ast.parse(path.read_text()), name, path.relative_to(root))
        problems += found_problems
        for target, attr, line in lazy:
            where = f"{path.relative_to(root)}:{line}"
            if target not in modules:
                problems.append(f"{where}: {attr!r} is loaded from module {target}, which does not exist")
            elif attr not in _top_level_names(ast.parse(modules[target][0].read_text())):
                problems.append(f"{where}: {attr!r} is loaded from module {target}, which does not define it")
    return problems


CHECKS = {"cycles": check_cycles, "orphans": check_orphans, "lazy": check_lazy}


def run_checks(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    return [problem for check in CHECKS.values() for problem in check(root, package)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to check (default: this one)")
    args = parser.parse_args(argv)
    problems = run_checks(args.root.resolve())
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} structure problem(s)", file=sys.stderr)
        return 1
    print("structure check: clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
