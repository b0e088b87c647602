#!/usr/bin/env bash
# Wheels of the dependencies the device image lacks (it has jax + CUDA, diffrax, equinox, optax,
# pytest, hypothesis, torch; no pydantic, and no network), for the device's Python 3.12:
#
#     bash benchmarks/gpu_wheels.sh      # → benchmarks/.wheels/ (git-ignored, ~20 MB)
#
# Run it here before the device call and pass `carry: ["benchmarks/.wheels"]`; gpu_check.sh
# installs, with --no-deps into a temporary folder, each wheel whose distribution the device
# does not have, so that the suite can run every test there.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf .wheels
mkdir -p .wheels
target=(--python-version "${PYVER:-3.12}" --only-binary=:all: --platform manylinux_2_17_x86_64
        -d .wheels)
# The project's dependencies and test extras that bring no numerical library of their own
# (numpy and scipy stay the device's), with their own dependencies...
for spec in "pydantic>=2" "jsonschema>=4" "sympy>=1.12"; do
    pip download -q "$spec" "${target[@]}"
done
# ...and scikit-learn alone (its numpy/scipy are the device's).
pip download -q --no-deps "scikit-learn>=1.3" joblib threadpoolctl "${target[@]}"
ls .wheels
