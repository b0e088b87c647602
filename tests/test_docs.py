"""The documentation site covers the public API: `conservation.__all__` is exactly what the
package re-exports, and every one of those names has an entry in the API reference. (The
site itself is built by `mkdocs build --strict` in `.ci/run`, not here.)"""

import ast
import pathlib
import re

import conservation

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ("plot.png", "mechanics.png", "report.png")


def _reexported():
    """Names bound by `from .<module> import <name> as <name>` in conservation/__init__.py."""
    tree = ast.parse((ROOT / "conservation" / "__init__.py").read_text())
    return [alias.asname or alias.name for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.level > 0 for alias in node.names]


def _documented():
    pages = sorted((ROOT / "docs" / "api").glob("*.md"))
    return [name for page in pages
            for name in re.findall(r"^::: conservation\.(\w+)\s*$", page.read_text(), re.M)]


def test_all_is_exactly_the_reexported_names():
    names = _reexported()
    assert len(names) > 50 and len(set(names)) == len(names)
    assert sorted(conservation.__all__) == sorted(names)
    assert all(hasattr(conservation, name) for name in conservation.__all__)


def test_api_reference_documents_every_public_name_once():
    documented = _documented()
    assert sorted(documented) == sorted(conservation.__all__)
    assert len(documented) == len(set(documented)), "a name documented twice"


def test_every_docs_page_is_in_the_nav_and_every_figure_is_shown():
    config = (ROOT / "mkdocs.yml").read_text()
    pages = [str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")]
    assert {p for p in pages if p not in config} == set()
    plots = (ROOT / "docs" / "plots.md").read_text()
    for figure in FIGURES:
        path = ROOT / "docs" / "figures" / figure
        assert f"(figures/{figure})" in plots
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size < 150_000


def test_getting_started_shows_the_readme_example_verbatim():
    # The README's first example is executed and its comments checked by test_readme.py;
    # the docs copy must be the same code.
    block = re.compile(r"```python\n(.*?)```", re.S)
    readme = block.search((ROOT / "README.md").read_text()).group(1)
    docs = block.search((ROOT / "docs" / "getting_started.md").read_text()).group(1)
    assert docs == readme
