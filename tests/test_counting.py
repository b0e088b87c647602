"""Law counting (Lie-algebra rank) and the polynomial law finder, against known counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conservation as cn
from conservation._cli import main


KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("widths", [(3, 2, 2), (2, 3, 2), (4, 1, 3)])
def test_two_layer_linear_has_r_r_plus_1_over_2_laws(widths):
    r = widths[1]
    count = cn.count_laws(cn.DeepLinear.random(widths, key=KEY), cn.MSE())
    assert count.laws == r * (r + 1) // 2
    assert count.gap > 1e6  # an unambiguous rank decision


def test_relu_attention_and_target_rank():
    relu = cn.count_laws(cn.MLP.random((3, 2, 2), key=KEY), cn.MSE())
    assert relu.laws == 2  # one per hidden neuron
    attention = cn.LightningAttention.random(4, key=KEY, causal=False)
    assert cn.count_laws(attention, cn.MSE()).laws == 2  # |Q|²−|K|², |K|²−|V|²
    proved = cn.count_laws(attention, cn.MSE(), target_rank=12 - 2)
    assert proved.proved and proved.laws == 2 and len(proved.rank_by_depth) <= 2


@pytest.mark.parametrize("loss, group, expected", [
    (cn.MSE(), cn.CyclicShift(3), 1), (cn.LogCosh(), cn.CyclicShift(3), 0),
    (cn.MSE(), None, 0)])
def test_seed_paper_fig2_counts(loss, group, expected):
    model = cn.DeepLinear.random((3, 1), key=KEY)
    assert cn.count_laws(model, loss, augment=group).laws == expected


def test_equivariant_layer_has_n_squared_minus_4_laws():
    augmentation = cn.Augmentation(cn.Permutations(3), equivariant=True)
    model = cn.DeepLinear.random((3, 3), key=KEY)
    assert cn.count_laws(model, cn.MSE(), augment=augmentation).laws == 3 * 3 - 4


@pytest.mark.parametrize("order, expected", [(18, 1), (12, 0)])
def test_seed_paper_fig1_counts(order, expected):
    neuron = cn.Neuron.random(2, key=KEY, init_scale=2.0)
    assert cn.count_laws(neuron, cn.MSE(), augment=cn.PlanarRotations(order)).laws == expected


def test_polynomial_finder_returns_the_balance_laws():
    model = cn.DeepLinear.random((2, 2, 2), key=KEY)
    found = cn.find_polynomial_laws(model, cn.MSE(), degree=2)
    assert len(found) == 3  # entries of the symmetric 2×2 balance matrix
    # Every balance-matrix entry lies in the span of what was found, and vice versa.
    names = found.names
    index = {m: i for i, m in enumerate(found.monomials)}

    def coefficient_vector(terms):
        v = np.zeros(len(found.monomials))
        for sign, (a, b) in terms:
            e = [0] * len(names)
            e[a] += 1
            e[b] += 1
            v[index[tuple(e)]] += sign
        return v

    w0 = lambda i, j: names.index(f"weights[0][{i},{j}]")  # noqa: E731
    w1 = lambda i, j: names.index(f"weights[1][{i},{j}]")  # noqa: E731
    balance = [coefficient_vector([(+1, (w0(i, k), w0(j, k))) for k in range(2)]
                                  + [(-1, (w1(k, i), w1(k, j))) for k in range(2)])
               for i, j in ((0, 0), (0, 1), (1, 1))]
    stacked = np.concatenate([found.coefficients, np.array(balance)])
    assert np.linalg.matrix_rank(stacked, tol=1e-8) == 3
    assert "weights[0][0,0]^2 + weights[0][0,1]^2 - weights[1][0,0]^2 - weights[1][1,0]^2" \
        in found.describe()


def test_polynomial_finder_quadratic_neuron_and_monitor_plug_in(getkey):
    model = cn.PolynomialNet.random((2, 1, 1), key=KEY)
    found = cn.find_polynomial_laws(model, cn.MSE(), degree=2)
    assert found.describe() == ["weights[0][0,0]^2 + weights[0][0,1]^2 - 2·weights[1][0,0]^2"]
    data = cn.Dataset(jax.random.normal(getkey(), (8, 2)), jax.random.normal(getkey(), (8, 1)))
    objective = cn.make_objective(cn.MSE(), data, model)
    result = cn.gradient_flow(objective, model, 2.0, rtol=1e-10, laws=found.laws)
    assert float(jnp.max(result.max_drift["polynomial[0]"])) <= 1e-9


def test_count_cli_prints_the_extra_law(capsys):
    import pathlib

    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "fig2_linear_c3.toml"
    assert main(["count", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:5] == ["all", "data", "mse", "3", "0"]
    assert out[2].split()[:6] == ["augmented", "by", "C3-shift", "mse", "3", "1"]
