"""How the code imports itself: no import cycle among sagan_ext's modules, counting imports inside
functions too (a cycle a function-level import hides is still one a reader must untangle), and
no test file importing another test file or conftest (shared helpers live in sagan_ext_testing)."""
import ast
from pathlib import Path

import sagan_ext

PACKAGE = Path(sagan_ext.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent


def package_imports(folder: Path) -> dict[str, set[str]]:
    """{module: the modules of the package it imports}, from import statements anywhere in each
    file and importlib.import_module calls with a literal name. A module is its file's stem
    ("__init__" for the package); `from . import name` of a non-module (`__version__`) imports
    __init__. Importing a submodule also runs __init__ first, but that is not an edge: it is
    true of every submodule and says nothing about what the code needs."""
    package = folder.name
    modules = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in sorted(folder.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: from {'.' * node.level}{node.module or ''} leaves the package"
                base = node.module if node.level == 1 else (node.module or "").removeprefix(package).lstrip(".")
                if node.level == 0 and not (node.module or "").startswith(package):
                    continue
                if base:
                    imported.add(base.split(".")[0])
                else:  # from . import a, b
                    imported |= {a.name if a.name in modules else "__init__" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] if "." in a.name else "__init__"
                             for a in node.names if a.name.split(".")[0] == package}
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and node.args[0].value.startswith(".")):
                imported.add(node.args[0].value.lstrip("."))
        graph[path.stem] = imported - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's shortest form once, as [a, b, ..., a] (depth-first, tiny graphs)."""
    found = set()

    def walk(start, node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.add(tuple(path + [start]))
            elif nxt not in path and nxt > start:  # each cycle from its smallest module only
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return [list(c) for c in sorted(found)]


def test_the_cycle_finder_finds_cycles():
    graph = {"_checks": {"backends"}, "backends": {"_checks", "reference"}, "reference": set(),
             "attention": {"biggan"}, "biggan": {"dropin"}, "dropin": {"attention"}}
    assert cycles(graph) == [["_checks", "backends", "_checks"], ["attention", "biggan", "dropin", "attention"]]


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import a\n__version__ = '1'\n")
    (package / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (package / "b.py").write_text("import importlib\nfrom . import __version__\nimport pkg.a\n"
                                  "c = importlib.import_module('.c', __package__)\n")
    (package / "c.py").write_text("import os\nfrom pkg import a\n")
    assert package_imports(package) == {"__init__": {"a"}, "a": {"b"}, "b": {"__init__", "a", "c"}, "c": {"a"}}


def test_no_import_cycle_inside_sagan_ext():
    graph = package_imports(PACKAGE)
    assert {"backends", "ops", "attention", "dropin", "train"} <= set(graph)
    assert cycles(graph) == [], f"import cycles in sagan_ext/: {cycles(graph)}"


def test_test_files_import_no_test_file_nor_conftest():
    """pytest imports test files and conftest itself (under names of its choosing): a test file
    importing one by module name runs it twice or depends on sys.path. Helpers shared by tests
    belong in sagan_ext_testing."""
    own = {p.stem for p in TESTS.glob("test_*.py")} | {"conftest"}
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not own & {n.split(".")[0] for n in names}, f"{path.name}:{node.lineno} imports {names}"
