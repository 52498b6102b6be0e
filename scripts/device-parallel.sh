#!/usr/bin/env bash
# One device call that runs everything at once on the GPU machine: the CUDA tests (three shards)
# beside the sanitizer and the demo, then the benchmarks (timed alone). Results under $OUT/{tests,
# sanitize,bench-*}. Environment: SANITIZE_FAMILIES, BENCH_PLAN ("family:args;family:args").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-/tmp/device-out}
export PYTEST_ARGS="-v --tb=short -p no:cacheprovider" PYTEST_K=cuda PACK_TRITON_CACHE=0
SITE=/tmp/site-t OUT=$OUT/tests DEVICE_DEADLINE_S=${TESTS_DEADLINE_S:-280} DEMO=1 \
    PYTEST_TARGETS="tests/test_rat.py tests/test_rat_module.py tests/test_landmark.py tests/test_landmark_module.py;tests/test_nsa.py tests/test_nsa_module.py;tests/test_nsa_selection.py tests/test_reliability.py" \
    bash scripts/device.sh tests >"$OUT/tests.log" 2>&1 &
tests_pid=$!
SITE=/tmp/site-s OUT=$OUT/sanitize DEVICE_DEADLINE_S=${TESTS_DEADLINE_S:-280} \
    FAMILIES="${SANITIZE_FAMILIES:-landmark nsa_selection}" \
    bash scripts/device.sh sanitize >"$OUT/sanitize.log" 2>&1 &
san_pid=$!
wait "$tests_pid"; wait "$san_pid"
tail -n 30 "$OUT/tests.log" "$OUT/sanitize.log"
IFS=';' read -ra plan <<<"${BENCH_PLAN:-landmark:}"
for item in "${plan[@]}"; do
    fam=${item%%:*}
    # shellcheck disable=SC2086
    SITE=/tmp/site-b OUT=$OUT/bench-$fam DEVICE_DEADLINE_S=${BENCH_DEADLINE_S:-150} \
        FAMILIES=$fam bash scripts/device.sh bench -- ${item#*:} 2>&1 | tail -n 12
done
