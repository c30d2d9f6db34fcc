"""The package's import graph is one-way: engine -> evaluation -> attacks -> modeling -> data.

Every import of a robustreid module, at module level or inside a function, is read with ``ast``; a
lower layer naming a higher one (even lazily, to dodge a cycle) fails with the file and the line.
"""
import ast
import os
import sys

PACKAGE = os.path.join(os.path.dirname(__file__), os.pardir, "projects", "RobustReID", "robustreid")
LAYERS = ("data", "modeling", "attacks", "evaluation", "engine")  # lowest first


def imported_subpackages(path, package_parts):
    """(line, first sub-package of robustreid) for every robustreid import in ``path``."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package_parts[:len(package_parts) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                if not node.module:  # "from .. import x": x may itself be a sub-package
                    for alias in node.names:
                        yield node.lineno, (parts + [alias.name])[1] if len(parts) == 1 else parts[1]
                    continue
            else:
                parts = node.module.split(".")
            if parts[0] == "robustreid" and len(parts) > 1:
                yield node.lineno, parts[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "robustreid" and len(parts) > 1:
                    yield node.lineno, parts[1]


def upward_imports():
    found = []
    for layer in LAYERS:
        higher = set(LAYERS[LAYERS.index(layer) + 1:])
        for root, _, files in os.walk(os.path.join(PACKAGE, layer)):
            rel = os.path.relpath(root, os.path.join(PACKAGE, os.pardir)).split(os.sep)
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    found += [f"{os.path.relpath(path, PACKAGE)}:{line} imports {target}"
                              for line, target in imported_subpackages(path, rel)
                              if target in higher]
    return found


def test_no_layer_imports_a_higher_one():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The walker must find a lazy relative import two levels up (the kind this test exists for).
    package = tmp_path / "robustreid"
    (package / "data" / "sub").mkdir(parents=True)
    for layer in LAYERS[1:]:
        (package / layer).mkdir()
    (package / "data" / "sub" / "m.py").write_text(
        "def f():\n    from ...engine.train_steps import X\n    from robustreid.evaluation import y\n")
    (package / "data" / "ok.py").write_text("from .sub import m\nfrom ..config import C\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(package))
    assert upward_imports() == ["data/sub/m.py:2 imports engine", "data/sub/m.py:3 imports evaluation"]
