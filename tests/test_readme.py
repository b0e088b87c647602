"""The README stays true: its two set-up commands, the CI script, and the library example."""

import pathlib
import re
import subprocess
import sys

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


def test_readme_library_example_runs_and_its_comments_hold():
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.splitlines()
    assert out[0] == "['success', 'success', 'success']"
    flow_drift, gd_drift, pointwise = map(float, out[1:4])
    assert flow_drift < 1e-8 < 1e-4 < gd_drift
    assert pointwise < 1e-12


def test_readme_augmentation_example_runs_and_its_comments_hold():
    example = re.findall(r"```python\n(.*?)```", README, re.S)[1]
    out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.splitlines()
    assert float(out[0].strip("[]")) < 1e-13
    assert out[1].startswith("{'ratio[I(W)]': 0,") and "'rowspace[W1·U]': 0" in out[1]
