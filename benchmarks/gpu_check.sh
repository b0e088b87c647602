#!/usr/bin/env bash
# The accelerator checks in one command, for a session lent a GPU (CI has none):
#
#     bash benchmarks/gpu_check.sh [suite] [ensembles] [solvers]     # default: all three
#
# - suite: the README's test command on the device (8 processes), its last lines to suite.log;
# - ensembles: bench_ensembles.py (B = 1, 64, 1024, 8192: lanes, refilled lanes, the previous
#   vmapped loop, diffrax's Tsit5, bare gradients, torchdiffeq) → ensembles_<backend>.json;
# - solvers: the stiff attention flow at B = 16 and 256 (stabilised, Kvaerno5, Tsit5 capped,
#   ROCK4 alone) → solvers_stiff_attention[_B256]_<backend>.json.
#
# Logs and JSON are copied to $OUT (the folder the device tool brings back) or ./gpu_check/.
# Each part has its own time limit (SUITE_S, ENSEMBLES_S, SOLVERS_S seconds; 300 each) so that
# one slow part cannot eat the others'; ENSEMBLES_ARGS / SOLVERS_ARGS replace the benchmarks'
# arguments (e.g. ENSEMBLES_ARGS="--quick --repeats 1" for a smoke run on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(suite ensembles solvers)
for part in "${parts[@]}"; do
    [[ $part =~ ^(suite|ensembles|solvers)$ ]] || {
        echo "unknown part '$part': choose suite, ensembles or solvers" >&2; exit 2; }
done
backend=$(python -c "import jax; print(jax.default_backend())")
{ echo "backend $backend"; nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1; } \
    > "$out/device.txt"
status=0
for part in "${parts[@]}"; do
    start=$SECONDS
    case $part in
        suite)
            timeout "${SUITE_S:-300}" python -m pytest -q -n 8 --dist loadfile 2>&1 \
                | tail -n 60 > "$out/suite.log" ;;
        ensembles)
            # shellcheck disable=SC2086  # the arguments are meant to split
            timeout "${ENSEMBLES_S:-300}" python benchmarks/bench_ensembles.py \
                ${ENSEMBLES_ARGS:---repeats 3} > "$out/ensembles.log" 2>&1 \
                && cp benchmarks/results/ensembles*_"$backend".json "$out/" ;;
        solvers)
            # shellcheck disable=SC2086
            timeout "${SOLVERS_S:-300}" python benchmarks/bench_solvers.py \
                ${SOLVERS_ARGS:---sections stiff_attention --batch 16 256 --repeats 0 \
                --tsit5-members 1 --rock4-members 2 --count-members 4} \
                > "$out/solvers.log" 2>&1 \
                && cp benchmarks/results/solvers_*_"$backend".json "$out/" ;;
    esac
    code=$?
    echo "$part: exit $code in $((SECONDS - start)) s" | tee -a "$out/device.txt"
    [[ $code -ne 0 ]] && status=1
done
exit $status
