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


def _run_block(index, capsys):
    """Run README python block `index` in a fresh namespace (each block is self-contained)
    and return (its namespace, its printed lines)."""
    block = re.findall(r"```python\n(.*?)```", README, re.S)[index]
    namespace = {"__name__": "__readme__"}
    exec(compile(block, f"README block {index}", "exec"), namespace)
    return namespace, capsys.readouterr().out.splitlines(), block


def test_readme_mechanics_example_runs_and_its_comments_hold(capsys):
    _, out, _ = _run_block(2, capsys)
    discrete, continuous = map(float, out)
    assert discrete < 1e-12  # exact identities: round-off
    assert 0 < continuous < 0.05  # O(η) at η = 0.05


def test_readme_counting_examples_give_the_counts_in_their_comments(capsys):
    namespace, _, block = _run_block(3, capsys)
    claims = re.findall(r"^(cn\.count_laws\(.*\)\.laws)\s+# (\d+)", block, re.M)
    assert len(claims) == 3
    for expression, count in claims:
        assert eval(expression, namespace) == int(count), expression
    assert namespace["found"].describe() == [
        "weights[0][0,0]^2 + weights[0][0,1]^2 - 2·weights[1][0,0]^2"]


def test_readme_bias_free_count_example_runs(capsys):
    namespace, out, _ = _run_block(4, capsys)
    assert namespace["net"].biases is None  # bias=False, as the comment says
    assert "converged" in out[0]


def test_readme_find_symmetries_example_gives_its_comments(capsys):
    _, out, block = _run_block(5, capsys)
    assert out[0] == re.search(r"^# (\[\('rescale.*)$", block, re.M).group(1)
    drift, identities = float(out[-2]), float(out[-1])
    assert drift <= 10 * 1e-8 and identities < 1e-12
