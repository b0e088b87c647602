"""Explicit Runge–Kutta steps with their stages unrolled: diffrax's Tsit5, Dopri5 and Dopri8
tableaus, in fewer and fused kernels.

diffrax runs the stages of a Runge–Kutta step in a loop (an `equinox.internal.while_loop`,
so that one code path serves explicit, implicit and stochastic methods): each stage takes
the tableau's row from a table and contracts it with the whole buffer of stage vectors
(`tensordot` of a (7,) row with the (7, P) buffer for Tsit5, zeros included), then writes
its slot back. For an explicit method the tableau is a constant, so here every stage is
written out: stage i's input is y₀ + Σ_j a_ij k_j with the non-zero a_ij as literals, one
elementwise expression that XLA fuses into one kernel, and no loop carries the buffer.

One step equals diffrax's to round-off (tested); an adaptive solve takes the same steps unless
a step's error estimate sits at the acceptance threshold to round-off. What the unrolled
stages gain over diffrax's loop in the lanes is measured in `docs/benchmarks/ensembles.md`
(`benchmarks/bench_ensembles.py`).
"""

from typing import ClassVar

import diffrax as dfx
import jax
import jax.numpy as jnp


class AbstractUnrolledERK(dfx.AbstractAdaptiveSolver):
    """An explicit, first-same-as-last Runge–Kutta method of a diffrax solver (`method`),
    with the same tableau, error estimate and dense output, its stages unrolled at trace time.
    Works on array states (`gradient_flow` integrates the flat parameter vector)."""

    method: ClassVar[type[dfx.AbstractERK]]
    term_structure: ClassVar = dfx.AbstractTerm

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if hasattr(cls, "method"):
            tableau = cls.method.tableau
            # The unrolled step uses f(y₁) of the last stage as the next step's f(y₀) and
            # the last stage's input as y₁.
            assert tableau.fsal and tableau.ssal and tableau.b_error is not None
            assert cls.interpolation_cls is cls.method.interpolation_cls

    def order(self, terms):
        return self.method().order(terms)

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def init(self, terms, t0, t1, y0, args):
        return terms.vf(t0, y0, args)  # f(t0, y0): the first stage of the first step

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, y_error, dense_info, f, result = self.step_stages(terms, t0, t1, y0, args,
                                                              solver_state, made_jump)
        return y1, y_error, dense_output(dense_info), f, result

    def step_stages(self, terms, t0, t1, y0, args, solver_state, made_jump):
        """`step`, with the dense output's stage vectors a tuple of the field's values f(yᵢ)
        and the step h beside them (`dense_output` makes diffrax's k = (h·f(yᵢ))ᵢ of it;
        the ensemble's lanes evaluate it with `interpolate`, never stacking it)."""
        tableau = self.method.tableau
        f = solver_state
        if made_jump is not False:  # after a jump the stored f(y0) is stale
            f = jnp.where(made_jump, terms.vf(t0, y0, args), f)
        h = terms.contr(t0, t1)
        # Each kⱼ = h·f(yⱼ) is formed where it is used, not kept: kept, each stage wrote one
        # more state-sized array (h·f beside f). The operations are diffrax's, a·(h·f), so
        # the numbers are the same to the bit.
        fs = [f]

        def k(fj):
            return terms.prod(fj, h)

        for row, c in zip(tableau.a_lower, tableau.c):
            y = y0 + sum(float(a) * k(fj) for a, fj in zip(row, fs) if a != 0)
            fs.append(terms.vf(t0 + float(c) * h, y, args))
        y_error = sum(float(b) * k(fj) for b, fj in zip(tableau.b_error, fs) if b != 0)
        # First same as last: y (the last stage's input) is y₁ and f = f(t1, y₁).
        return y, y_error, dict(y0=y0, y1=y, f=tuple(fs), h=h), fs[-1], dfx.RESULTS.successful

    def interpolate(self, dense_info, t0, t1, t):
        """y(t) on the step [t0, t1] from `step_stages`' dense output: diffrax's
        interpolation of this method, evaluated as w₀y₀ + w₁y₁ + Σᵢ bᵢ·(h·f(yᵢ)) with its
        weights at t. The weights are the transpose of the interpolation, which is linear in
        y₀, y₁ and the kᵢ: one elementwise expression over the stage vectors, where diffrax
        stacks them into one (stages, P) array and contracts it (at every save, most of what
        a save cost). Equal to diffrax's to round-off (the order of the sum differs)."""
        f, h = dense_info["f"], dense_info["h"]
        zero = jnp.zeros((), jnp.result_type(h))

        def evaluate(y0, y1, k):
            return self.interpolation_cls(t0=t0, t1=t1, y0=y0, y1=y1, k=k).evaluate(t)

        w0, w1, b = jax.linear_transpose(evaluate, zero, zero, jnp.zeros(len(f), zero.dtype))(
            jnp.ones_like(zero))
        y = w0 * dense_info["y0"] + w1 * dense_info["y1"]
        return y + sum(b[i] * (fi * h) for i, fi in enumerate(f))


def dense_output(dense_info):
    """diffrax's dense output (`y0`, `y1`, `k` = the stacked h·f(yᵢ)) of an unrolled step's
    `step_stages` (its field values f and step h)."""
    k = jnp.stack(dense_info["f"]) * dense_info["h"]
    return dict(y0=dense_info["y0"], y1=dense_info["y1"], k=k)


class Tsit5(AbstractUnrolledERK):
    """Tsitouras' 5(4) method (`diffrax.Tsit5`), stages unrolled."""

    method: ClassVar = dfx.Tsit5
    interpolation_cls: ClassVar = dfx.Tsit5.interpolation_cls


class Dopri5(AbstractUnrolledERK):
    """Dormand–Prince 5(4) (`diffrax.Dopri5`), stages unrolled."""

    method: ClassVar = dfx.Dopri5
    interpolation_cls: ClassVar = dfx.Dopri5.interpolation_cls


class Dopri8(AbstractUnrolledERK):
    """Dormand–Prince 8(7) (`diffrax.Dopri8`), stages unrolled."""

    method: ClassVar = dfx.Dopri8
    interpolation_cls: ClassVar = dfx.Dopri8.interpolation_cls


for _cls in (Tsit5, Dopri5, Dopri8):
    _cls.__init__.__doc__ = None
