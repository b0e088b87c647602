"""The package reads top-down: models → data → laws → dynamics → experiments. A lower layer
never imports an upper one (checked on the source, imports inside functions included).

Models, data and laws form one layer: a model declares its laws (`model.laws()`) and an MLP's
mechanics laws know its loss, so those three may import each other; none of them imports the
dynamics, and nothing below the experiments imports them."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "conservation"
LAYERS = ["_models", "_data", "_laws", "_dynamics", "_experiments"]


def _imported_layers(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            module = node.module or ""
            if node.level == 1:  # a sibling inside the same subpackage
                continue
            top = module.split(".")[0]
            if top in LAYERS:
                found.add(top)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("conservation."):
            top = node.module.split(".")[1]
            if top in LAYERS:
                found.add(top)
    return found


RANK = {"_models": 0, "_data": 0, "_laws": 0, "_dynamics": 1, "_experiments": 2}


def test_no_layer_imports_an_upper_one():
    wrong = []
    for layer in LAYERS:
        for path in sorted((PACKAGE / layer).glob("*.py")):
            for imported in _imported_layers(path):
                if RANK[imported] > RANK[layer]:
                    wrong.append(f"{layer}/{path.name} imports {imported}")
    assert not wrong, wrong


def test_top_level_helpers_import_no_layer():
    for name in ("_validation.py", "_memory.py", "_cache.py", "_text.py"):
        assert not _imported_layers(PACKAGE / name), name
