"""The README stays true and short: its two set-up commands, the CI script, the library example
(run as printed, its comments checked), its links, and its length. The guides' examples that
used to live here are run by test_docs.py."""

import pathlib
import re

import pytest
from docblocks import blocks, check, kind, run

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _setup_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block and README.index(block.group(0)) < README.index("\n## "), \
        "README must start with the set-up block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_exactly_two_setup_commands():
    install_and_run, tests = _setup_commands()
    assert "pip install" in install_and_run
    assert "conservation run configs/quickstart.toml" in install_and_run
    assert (ROOT / "configs" / "quickstart.toml").is_file()
    assert tests.startswith("python -m pytest")


def test_ci_runs_the_readme_test_command_after_a_fresh_install():
    ci = (ROOT / ".ci" / "run").read_text()
    _, tests = _setup_commands()
    commands = [line.strip() for line in ci.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == tests
    assert any("venv" in line for line in commands) and any("pip install" in c for c in commands)


def test_readme_is_short_and_keeps_measurements_in_the_docs():
    assert len(README.splitlines()) <= 150
    assert "|---" not in README, "tables (measurements, benchmarks) belong in docs/"
    assert len(blocks(README, "README.md")) == 1, "one example; the others live in docs/guides"


def test_readme_links_point_at_existing_files():
    links = [target for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
             if "://" not in target]
    assert {"docs/guides/augmentation.md", "docs/guides/counting.md", "docs/plots.md",
            "docs/api/index.md", "docs/figures/plot.png", "CITATION.cff"} <= set(links)
    assert [t for t in links if not (ROOT / t).exists()] == []


@pytest.fixture(scope="module")
def example():
    (block,) = blocks(README, "README.md")
    assert block.skip is None
    return run(block)


def test_readme_library_example_runs_and_its_comments_hold(example):
    _, claims, out = example
    # Every print line carries a claim, and each holds (order of magnitude, literal).
    assert [kind(c.comment) for c in claims] == ["literal", "order", "order", "order"]
    for claim in claims:
        check(claim)
    # The physics, one-sided where the comments are approximate: the flow keeps the law to
    # its tolerance, gradient descent breaks it by orders of magnitude more, and the
    # pointwise identity holds to round-off.
    out = out.splitlines()
    assert out[0] == "['success', 'success', 'success']"
    flow_drift, gd_drift, pointwise = map(float, out[1:4])
    assert flow_drift < 1e-8 < 1e-4 < gd_drift
    assert pointwise < 1e-12


def test_the_readme_test_command_survives_a_crashed_worker(tmp_path):
    """A worker that dies inside a compiled library (an abort) costs no more than its test:
    the test runs once more (a rerun, named in the summary), the other tests all run, and the
    run ends. A test that crashes again fails. With xdist's own `loadfile` scheduler, this
    project's run waits for ever (tests/_xdist.py)."""
    import subprocess
    import sys

    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n\n\n"
        "def pytest_configure(config):\n"
        "    import _xdist\n\n"
        "    config.pluginmanager.register(_xdist, 'crash-safe-loadfile')\n")
    # Each file's first test finishes; test_b's second aborts its worker every time, after
    # the worker finished test_a: the crash hands the finished file back with the unfinished
    # one. test_d's aborts the first time only (a flake).
    (tmp_path / "test_a.py").write_text("def test_1():\n    pass\n\n\ndef test_2():\n    pass\n")
    (tmp_path / "test_b.py").write_text(
        "import os\n\n\ndef test_1():\n    pass\n\n\ndef test_crash():\n    os.abort()\n\n\n"
        "def test_after():\n    pass\n")
    (tmp_path / "test_c.py").write_text("def test_1():\n    pass\n")
    (tmp_path / "test_d.py").write_text(
        "import os\nimport pathlib\n\n\ndef test_once():\n"
        f"    flag = pathlib.Path({str(tmp_path / 'crashed')!r})\n"
        "    if not flag.exists():\n        flag.touch()\n        os.abort()\n")
    _, command = _setup_commands()
    done = subprocess.run([sys.executable, *command.split()[1:], "-p", "no:cacheprovider",
                           "-n", "1", "-p", "no:faulthandler"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=90)
    out = done.stdout
    assert "1 failed, 6 passed, 2 rerun" in out, out + done.stderr
    assert "crashed while running 'test_b.py::test_crash'" in out
    assert "test_d.py::test_once: worker" in out  # named among the reruns
    assert done.returncode == 1
