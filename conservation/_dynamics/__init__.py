"""Dynamics: gradient flow (diffrax, stabilised solvers), discrete optimizers (optax), broken-
law mechanics, and the in-run monitors."""
