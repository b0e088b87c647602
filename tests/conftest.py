import os

# The suite's programs are tiny and each compiles once: LLVM's optimisation passes cost more
# than they save (test_mechanics 78 s -> 47 s on 2 cores). Numerics stay IEEE (no fast-math);
# benchmarks never import this file. Set before jax initialises its backend. On a GPU the
# suite ran ~5× slower per test than on the CPU (an H200, 14 workers: compilation), and GEMM
# autotuning compiles and times candidate kernels for every dot shape: off (it picks among
# implementations; no test depends on which).
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true", "--xla_gpu_autotune_level=0"]).strip()

# A worker that aborts in glibc (a heap check) says why in the run's log, not on a terminal
# that CI has not got.
os.environ.setdefault("LIBC_FATAL_STDERR_", "1")

# One persistent compilation cache for the whole run: the xdist workers and the CLI's
# subprocesses (which inherit the variable) load each other's compiled programs instead of
# compiling them again. A fresh folder per run (the controller makes it before the workers
# start), so no program of an earlier checkout is ever reused.
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "CONSERVATION_CACHE_DIR" not in os.environ:
    os.environ["CONSERVATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="conservation-test-cache-")
    _OWN_CACHE = os.environ["CONSERVATION_CACHE_DIR"]
else:
    _OWN_CACHE = None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import conservation as cn  # noqa: E402

cn.enable_compilation_cache()


def pytest_configure(config):
    # float64 is the package default; make any silent rank promotion an error in tests.
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if config.pluginmanager.hasplugin("xdist"):  # `--dist loadfile` survives a crashed worker
        import _xdist

        config.pluginmanager.register(_xdist, "crash-safe-loadfile")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:  # the process that made the folder (xdist's controller)
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def getkey():
    """Fresh PRNG keys, deterministic per test."""
    state = {"key": jax.random.PRNGKey(1234)}

    def next_key():
        state["key"], sub = jax.random.split(state["key"])
        return sub

    return next_key


def model_zoo(key):
    """One instance of every model variant the library ships, with matching inputs."""
    ks = jax.random.split(key, 16)
    vec3 = cn.gaussian_inputs(ks[0], 7, (3,))
    vec2 = cn.gaussian_inputs(ks[1], 7, (2,))
    seq = cn.gaussian_inputs(ks[2], 4, (9, 4))
    return {
        "deep_linear": (cn.DeepLinear.random((3, 5, 4, 2), key=ks[3]), vec3),
        "quadratic": (cn.PolynomialNet.random((3, 4, 2), key=ks[4]), vec3),
        "cubic": (cn.PolynomialNet.random((3, 4, 1), key=ks[5], activation="cubic"), vec3),
        "sextic_neuron": (cn.PolynomialNet.random((2, 1, 1), key=ks[6], activation="sextic"),
                          vec2),
        "deep_quadratic": (cn.PolynomialNet.random((3, 3, 2, 2), key=ks[7]), vec3),
        "neuron": (cn.Neuron.random(2, key=ks[13], init_scale=2.0), vec2),
        "deep_inhomogeneous": (
            cn.PolynomialNet.random((2, 3, 2, 1), key=ks[8], activation=(0.3, 1.0, -0.5)), vec2),
        "attention_bare": (cn.LightningAttention.random(4, key=ks[9], causal=False), seq),
        "attention_decay": (cn.LightningAttention.random(4, key=ks[10], decay=0.8), seq),
        "attention_heads_out": (
            cn.LightningAttention.random(4, key=ks[11], heads=2, key_dim=2, value_dim=3,
                                         out_dim=2, decay=0.9, block_size=4), seq),
        "attention_heads_concat": (
            cn.LightningAttention.random(4, key=ks[12], heads=3, key_dim=2, value_dim=2,
                                         block_size=3), seq),
    }


@pytest.fixture(scope="session")
def zoo():
    return model_zoo(jax.random.PRNGKey(7))


def relative_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-300))
