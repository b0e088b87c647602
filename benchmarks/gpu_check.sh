#!/usr/bin/env bash
# The accelerator checks, for a session lent a GPU (CI has none):
#
#     bash benchmarks/gpu_check.sh [ensembles] [memory] [suite] [solvers]   # default: all four
#
# - ensembles: bench_ensembles.py (B = 1, 64, 1024, 8192: lanes, refilled lanes, diffrax's Tsit5
#   in the lanes, the previous vmapped loop, bare solve, bare gradients, torchdiffeq)
#   → ensembles_<backend>.json, written after every size;
# - memory: bench_memory.py (the default batch_size and the device's memory peak against the
#   library's estimate: deep linear at B = 8192, the 106 k-parameter flow at B = 256)
#   → memory_<backend>.json;
# - suite: the README's test command on the device (SUITE_WORKERS processes, default 14); at its
#   time limit it is interrupted (SIGINT), so that pytest still prints what failed so far;
# - solvers: the stiff attention flow at B = 16, then at B = 256, each in its own process with
#   half of SOLVERS_S (stabilised, Kvaerno5, Tsit5 capped, ROCK4 alone)
#   → solvers_stiff_attention_B16_<backend>.json, solvers_stiff_attention_B256_<backend>.json.
#
# The device tool's budget is 15 min with the machine's start, one command at most 10 min: run
# `ensembles memory suite` in one call and `solvers` in a second while the machine is warm.
# Measured on an H200 (6736fbd, benchmarks/results/gpu_check_6736fbd/): the machine's start
# ~30 s, ensembles 183 s, memory 69 s, the suite ~half its tests in 180 s (14 workers: the whole
# needs ~400 s), each solvers process (B = 16, 256) more than 135 s. With the ensembles and
# memory JSON in hand, spend a session's budget on `suite` (SUITE_S=420, wheels carried) and
# `solvers` (SOLVERS_S=300).
# Logs and JSON are copied to $OUT (the folder the device tool brings back) or ./gpu_check/.
# Each part has its own time limit (ENSEMBLES_S 230, MEMORY_S 70, SUITE_S 200, SOLVERS_S 280
# seconds) so that one slow part cannot eat the others'; ENSEMBLES_ARGS / SOLVERS_ARGS replace
# the benchmarks' arguments (e.g. ENSEMBLES_ARGS="--quick --repeats 1" for a smoke run on the
# CPU, MEMORY_ARGS=--quick). PYTHON names the interpreter (default python3). Dependencies the
# device lacks come from benchmarks/.wheels when carried (`bash benchmarks/gpu_wheels.sh`).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(ensembles memory suite solvers)
for part in "${parts[@]}"; do
    [[ $part =~ ^(suite|ensembles|memory|solvers)$ ]] || {
        echo "unknown part '$part': choose ensembles, memory, suite or solvers" >&2; exit 2; }
done
# The dependencies the device image lacks (pydantic, ...), from wheels carried along
# (`bash benchmarks/gpu_wheels.sh`, carry benchmarks/.wheels): each wheel whose distribution is
# not installed goes, without its dependencies, to a temporary folder on PYTHONPATH.
if [[ -d benchmarks/.wheels ]]; then
    missing=()
    for wheel in benchmarks/.wheels/*.whl; do
        dist=$(basename "$wheel" | cut -d- -f1)
        $py -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" \
            2>/dev/null || missing+=("$wheel")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        site=$(mktemp -d)
        $py -m pip install -q --no-deps --no-index --target "$site" "${missing[@]}" \
            && export PYTHONPATH=$PYTHONPATH:$site \
            && echo "installed from benchmarks/.wheels: ${missing[*]##*/}" >&2
    fi
fi
backend=$($py -c "import jax; print(jax.default_backend())")
{ echo "backend $backend"; $py -c "import jax; d = jax.devices()[0]; \
print(d.device_kind, '|', getattr(d.client, 'platform_version', ''), '| jax', jax.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; } \
    > "$out/device.txt"
# Copy to $out the JSON this run wrote (newer than the marker made before any part ran), never
# an older one beside it.
started=$(mktemp)
trap 'rm -rf "$started" ${site:+"$site"}' EXIT  # the marker, and the wheels' folder if any
fresh() {
    find benchmarks/results -maxdepth 1 -name "$1*_$backend.json" -newer "$started" \
        -exec cp {} "$out/" \;
}
status=0
for part in "${parts[@]}"; do
    start=$SECONDS
    case $part in
        ensembles)
            # shellcheck disable=SC2086  # the arguments are meant to split
            timeout "${ENSEMBLES_S:-230}" $py benchmarks/bench_ensembles.py \
                ${ENSEMBLES_ARGS:---repeats 2} > "$out/ensembles.log" 2>&1
            code=$?
            fresh ensembles ;;
        memory)
            # shellcheck disable=SC2086
            timeout "${MEMORY_S:-70}" $py benchmarks/bench_memory.py ${MEMORY_ARGS:-} \
                > "$out/memory.log" 2>&1
            code=$?
            fresh memory ;;
        suite)
            timeout -s INT -k 20 "${SUITE_S:-200}" $py -m pytest -q -rfE \
                -n "${SUITE_WORKERS:-14}" --dist loadfile > "$out/suite.log" 2>&1
            code=$?
            tail -n 25 "$out/suite.log" ;;
        solvers)
            code=0
            for b in 16 256; do
                # shellcheck disable=SC2086
                timeout "$(( ${SOLVERS_S:-280} / 2 ))" $py benchmarks/bench_solvers.py \
                    ${SOLVERS_ARGS:---sections stiff_attention --repeats 0 --tsit5-members 1 \
                    --rock4-members 2 --count-members 4} --batch "$b" \
                    > "$out/solvers_B$b.log" 2>&1 || code=$?
            done
            fresh solvers_ ;;
    esac
    echo "$part: exit $code in $((SECONDS - start)) s" | tee -a "$out/device.txt"
    [[ $code -ne 0 ]] && status=1
done
exit $status
