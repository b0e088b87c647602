"""The documentation site is true: `conservation.__all__` is exactly what the package
re-exports and every name has an entry in the API reference; every page is in the nav; every
```python block of every page runs as printed and the values its comments claim hold
(tests/docblocks.py); the benchmark pages' tables equal a fresh generation from the JSON.
(The site itself is built by `mkdocs build --strict` in `.ci/run`, not here.)"""

import ast
import copy
import importlib.util
import pathlib
import re

import pytest
from docblocks import Claim, blocks, check, kind, run

import conservation

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FIGURES = ("plot.png", "mechanics.png", "report.png")
GUIDES = ("augmentation", "architecture_laws", "counting", "dynamics", "experiments")
MAX_SKIPPED = 2  # blocks marked `<!-- skip: reason -->`: keep them few


def _reexported():
    """Names bound by `from .<module> import <name> as <name>` in conservation/__init__.py:
    at the top level (imported eagerly) or under `if TYPE_CHECKING:` (imported on first use
    by the package's `__getattr__`, from the module its `_LAZY` table names)."""
    tree = ast.parse((ROOT / "conservation" / "__init__.py").read_text())
    lazy = [node for top in tree.body
            if isinstance(top, ast.If) and ast.unparse(top.test) == "TYPE_CHECKING"
            for node in top.body]
    eager = [(node, alias) for node in tree.body
             if isinstance(node, ast.ImportFrom) and node.level > 0 for alias in node.names]
    typed = [(node, alias) for node in lazy
             if isinstance(node, ast.ImportFrom) and node.level > 0 for alias in node.names]
    # The lazy table imports each name from the module the typed import names.
    assert {alias.asname or alias.name: f".{node.module}" for node, alias in typed} == (
        conservation._LAZY)
    return [alias.asname or alias.name for _, alias in eager + typed]


def _documented():
    pages = sorted((DOCS / "api").glob("*.md"))
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
    pages = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")]
    assert {p for p in pages if p not in config} == set()
    assert {f"guides/{g}.md" for g in GUIDES} <= set(pages)
    plots = (DOCS / "plots.md").read_text()
    for figure in FIGURES:
        path = DOCS / "figures" / figure
        assert f"(figures/{figure})" in plots
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size < 150_000


_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def test_getting_started_shows_the_readme_example_verbatim():
    # The README's example is executed and its comments checked by test_readme.py;
    # the docs copy must be the same code (and is not run a second time below).
    readme = _BLOCK.search((ROOT / "README.md").read_text()).group(1)
    docs = _BLOCK.search((DOCS / "getting_started.md").read_text()).group(1)
    assert docs == readme


# --- every code block of every page --------------------------------------------------------

README_EXAMPLE = _BLOCK.search((ROOT / "README.md").read_text()).group(1)
BLOCKS = [block for page in sorted(DOCS.rglob("*.md"))
          for block in blocks(page.read_text(), str(page.relative_to(DOCS)))]


def _extra_checks():
    """Checks beyond the comments, for blocks recognised by a line of their code: the physics
    each example shows, two-sided where the comment is an order of magnitude."""

    def augmentation(ns, out):
        assert float(out[0].strip("[]")) < 1e-13  # round-off, for gradient descent
        assert ns["result"].summary()["ill_conditioned"] == {"ratio[I(W)]": 0,
                                                             "rowspace[W1·U]": 0}

    def mechanics(ns, out):
        discrete, continuous = map(float, out)
        assert discrete < 1e-12  # exact identities: round-off
        assert 1e-4 < continuous < 0.05  # O(η) at η = 0.05: present, and small

    def counting(ns, out):
        assert ns["found"].describe() == [
            "weights[0][0,0]^2 + weights[0][0,1]^2 - 2·weights[1][0,0]^2"]
        assert all(isinstance(law, conservation.FunctionLaw) for law in ns["found"].laws)

    def bias_free(ns, out):
        assert ns["net"].biases is None
        assert ns["count"].verdict == "converged" and "converged" in out[0]

    def symmetries(ns, out):
        drift, identities = float(out[-2]), float(out[-1])
        assert drift <= 10 * 1e-8 and identities < 1e-12

    def loss_goal(ns, out):
        loss, t_final = map(float, out)
        assert abs(loss / 1e-6 - 1) < 1e-6  # the state at the crossing, not a save near it
        assert 0 < t_final < 100 and ns["gd"].status_names() == ["diverged"]

    # Markers specific enough to name one block of the guides (others' pages may reuse APIs).
    return {"laws = cn.augmentation_laws(model, group)   # (rowspace": augmentation,
            "laws = cn.mechanics_laws(ensemble[0], cn.CrossEntropy())  # rescale": mechanics,
            "found = cn.find_polynomial_laws(cn.PolynomialNet.random([2, 1, 1]": counting,
            "net = cn.MLP.random([5, 2, 3, 5, 3], key=jax.random.PRNGKey(0),": bias_free,
            "found = cn.find_symmetries(model, cn.CrossEntropy(), data, key=key)\n"
            "print([(law.name, law.components)": symmetries,
            "t1=100.0, rtol=1e-10, stop_at_loss=1e-6)": loss_goal}


EXTRA = _extra_checks()


def test_code_blocks_are_found_and_skips_are_few():
    names = {block.name.split(" block")[0] for block in BLOCKS}
    assert {f"guides/{g}.md" for g in GUIDES} <= names
    skipped = [block for block in BLOCKS if block.skip is not None]
    assert len(skipped) <= MAX_SKIPPED and all(block.skip for block in skipped), \
        [(b.name, b.skip) for b in skipped]
    # Every extra check found its block (an edited example must keep its check).
    for marker in EXTRA:
        assert sum(marker in block.code for block in BLOCKS) == 1, marker


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_code_block_runs_as_printed_and_its_comments_hold(block):
    if block.skip is not None:
        pytest.skip(block.skip)
    if block.code == README_EXAMPLE:
        pytest.skip("the README example, run and checked by test_readme.py")
    namespace, claims, out = run(block)
    for claim in claims:
        check(claim)
    for marker, extra in EXTRA.items():
        if marker in block.code:
            extra(namespace, out.splitlines())


def test_guide_examples_claim_values():
    # The guides' examples state what they print; the claims must be found (and so checked).
    claims = {}
    for block in BLOCKS:
        if block.name.startswith("guides/") and block.skip is None:
            text = block.code
            claims[block.name] = sum(
                kind(c) != "prose" for c in re.findall(r"#\s*(.*)", text))
    assert claims and all(n >= 1 for n in claims.values()), claims


@pytest.mark.parametrize("comment, output, holds", [
    ("~1e-9: conserved", "9.8e-10", True),
    ("~1e-9: conserved", "9.8e-12", False),  # 100× too small
    ("~1e-9", "2e-8", False),  # 20× too large
    ("6.6e-15: exact", "[6.0e-15 7.1e-15]", True),
    ("6.6e-15: exact", "[6.0e-15 7.1e-13]", False),  # one value off
    ("3 = r(r+1)/2", "3", True),
    ("3 = r(r+1)/2", "4", False),
    ("['success', 'success']", "['success', 'success']", True),
    ("['success', 'success']", "['success', 'diverged']", False),
    ("{'a': 0, …}: meaningful", "{'a': 0, 'b': 1}", True),
    ("{'a': 0, …}: meaningful", "{'a': 1, 'b': 0}", False),
    ("(27, 'converged')", "(27, 'converged')", True),
    ("(27, 'converged')", "(28, 'converged')", False),
    ("True: bias=False", "True", True),
    ("True: bias=False", "False", False),
])
def test_comment_claims_are_checked_both_ways(comment, output, holds):
    claim = Claim(1, "x", comment, output)
    if holds:
        check(claim)
    else:
        with pytest.raises(AssertionError):
            check(claim)


def test_a_block_is_paired_with_its_outputs():
    (block,) = blocks("```python\nx = 3\nprint(x * 2)  # 6\nx + 1  # 4\nprint([x])\n"
                      "# [3]\nprint('a')  # prose, no claim\n```\n", "t.md")
    _, claims, out = run(block)
    assert [(c.comment, c.output) for c in claims] == [("6", "6"), ("4", "4"), ("[3]", "[3]")]
    assert out == "6\n[3]\na\n"
    (skipped,) = blocks("<!-- skip: needs a cluster -->\n```python\nimport nothing\n```\n", "t")
    assert skipped.skip == "needs a cluster"


# --- benchmark tables ----------------------------------------------------------------------

def _docs_tables():
    spec = importlib.util.spec_from_file_location(
        "_docs_tables", ROOT / "benchmarks" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tables_equal_a_fresh_generation_and_are_shown():
    docs_tables = _docs_tables()
    assert docs_tables.stale() == [], "run `python benchmarks/docs_tables.py`"
    included = {m for page in DOCS.rglob("*.md") for m in re.findall(
        r'--8<-- "benchmarks/results/tables/(\w+)\.md"', page.read_text())}
    assert included == set(docs_tables.generate())


def test_benchmark_tables_come_from_the_json():
    # Negative control: a different measurement gives a different table.
    docs_tables = _docs_tables()
    t = docs_tables.tables_module()
    load = t._load

    def doubled(name):
        report = copy.deepcopy(load(name))
        if name == "core_cpu.json":
            report["moments"]["run_s"] *= 2
        return report

    t._load = doubled
    fresh = docs_tables.generate(t)
    committed = (docs_tables.OUT / "core.md").read_text()
    assert fresh["core"] != committed
    run_s = load("core_cpu.json")["moments"]["run_s"]
    assert f"| {run_s:.2f} | 1.00 |" in committed and f"| {2 * run_s:.2f} | 1.00 |" in fresh["core"]
