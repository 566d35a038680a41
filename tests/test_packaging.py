"""pyproject.toml declares what the code imports; constraints.txt pins every declared distribution."""
import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"cmg_core", "app", "pages", "bench", "tests"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _imports(folder: str) -> set[str]:
    """Top-level third-party modules imported anywhere under `folder` (module level or inside functions)."""
    out = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and m not in LOCAL}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    dists = md.packages_distributions()
    return {m: {d.lower().replace("_", "-") for d in dists.get(m, [])} for m in modules}


def test_pyproject_declares_every_import():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    missing = []
    # cmg_core may use plotly of the [app] extra for the audit's fig10.html (skipped without it)
    for folder, allowed in (("cmg_core", core | extras["analysis"] | extras["clip"] | {"plotly"}),
                            ("app", core | extras["app"]), ("pages", core | extras["app"])):
        for module, dists in _distributions(_imports(folder)).items():
            if not dists:
                missing.append(f"{folder}: {module} (not installed here)")
            elif not dists & allowed:
                missing.append(f"{folder}: {module} (from {sorted(dists)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_constraints_pin_every_declared_distribution():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[_name(name)] = version
    assert declared <= set(pins), f"not pinned in constraints.txt: {sorted(declared - set(pins))}"
    assert "-c constraints.txt" in (ROOT / "requirements.txt").read_text()
