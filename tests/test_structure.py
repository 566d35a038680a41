"""bench/check_structure.py: no import circle among cmg_core modules (function-level imports included), no module
without a caller outside tests, lazy string imports that resolve. The checker itself is tested on a fake package."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "check_structure.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_structure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cs = _checker()


def test_no_import_circle():
    assert cs.check_cycles(ROOT) == []


def test_every_module_has_a_caller_outside_tests():
    assert cs.check_orphans(ROOT) == []


def test_lazy_string_imports_resolve():
    assert cs.check_lazy(ROOT) == []


def test_the_lazy_exports_count_as_imports():
    graph = cs.import_graph(ROOT)
    assert {"cmg_core.api", "cmg_core.predict", "cmg_core.detector", "cmg_core.config",
            "cmg_core.train"} <= set(graph["cmg_core"])
    loaders = {"cmg_core.data.synthetic", "cmg_core.data.ucm", "cmg_core.data.packed"}
    assert loaders <= set(graph["cmg_core.data.registry"])


# what every fake package holds: the lazy maps the checker reads (LAZY_MAPS), an entry point importing the registry
BASE = {
    "cmg_core/__init__.py": '_EXPORTS = {"A": "a"}\n',
    "cmg_core/cli.py": "from cmg_core.data.registry import DATASETS\n",
    "cmg_core/data/__init__.py": "",
    "cmg_core/data/registry.py": 'DATASETS = {"x": ("xmod", "load_x", "a loader", False)}\n',
    "cmg_core/data/xmod.py": "def load_x(root):\n    return root\n",
}


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in {**BASE, **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_a_function_level_circle_and_an_orphan(tmp_path):
    _write(tmp_path, {
        "cmg_core/a.py": "from .b import g\n\nA = 1\n",
        "cmg_core/b.py": "def g():\n    from . import a  # hidden in a function, still a circle\n    return a.A\n",
        "cmg_core/orphan.py": "X = 1\n",
        "cmg_core/cli.py": "from cmg_core.sub import helper\nfrom cmg_core.data.registry import DATASETS\n",
        "cmg_core/sub/__init__.py": "from .helper import h\n",
        "cmg_core/sub/helper.py": "from . import other\n\ndef h():\n    return other\n",
        "cmg_core/sub/other.py": "from ..a import A\n",
        "tests/test_orphan.py": "import cmg_core.orphan\n",  # tests are no callers
        "pyproject.toml": '[project]\nname = "x"\n[project.scripts]\nx = "cmg_core.cli:main"\n',
    })
    cycles = cs.check_cycles(tmp_path)
    assert len(cycles) == 1 and "cmg_core.a, cmg_core.b" in cycles[0] and "cmg_core/b.py:2" in cycles[0]
    orphans = cs.check_orphans(tmp_path)
    assert len(orphans) == 1 and "cmg_core.orphan" in orphans[0]
    # `from . import other` in a submodule is an import of the submodule, not of its package
    assert set(cs.import_graph(tmp_path)["cmg_core.sub.helper"]) == {"cmg_core.sub.other"}
    assert cs.check_lazy(tmp_path) == []

    (tmp_path / "cmg_core/__init__.py").write_text('_EXPORTS = {"A": "a", "Gone": "missing", "Nope": "b"}\n')
    lazy = cs.check_lazy(tmp_path)
    assert len(lazy) == 2 and "cmg_core.missing" in lazy[0] and "'Nope'" in lazy[1]

    out = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "import circle" in out.stdout and "cmg_core.orphan" in out.stdout


def test_the_checker_passes_a_clean_package(tmp_path):
    _write(tmp_path, {
        "cmg_core/a.py": "from .b import g\n\nA = g()\n",
        "cmg_core/b.py": "def g():\n    return 1\n",
    })
    out = subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
