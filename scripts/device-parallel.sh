#!/usr/bin/env bash
# One device call that runs everything at once on the GPU machine: the CUDA tests (pytest-xdist
# workers) and test_reliability.py (alone: its 2^31-element cases need most of a GPU, its
# non-current-device case two GPUs) beside the sanitizer (one process per family and tool), all
# on the first GPU; the benchmarks on the second GPU at the same time (after the rest on a one-GPU
# machine), so that nothing else runs on the GPU they time. The device tool returns at most 8
# files, so everything comes back as $OUT/logs.tgz; failures and summaries are printed.
# Environment: TESTS (0: none), RELIABILITY (0: not test_reliability.py), PYTEST_K, TEST_WORKERS, SANITIZE_FAMILIES, SANITIZE_TOOLS,
# SANITIZE_ONLY, BENCH_PLAN ("family:args;family:args"; empty: no benchmarks), *_DEADLINE_S.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
second=$( ((gpus > 1)) && echo 1 || echo 0)
run_benches() {
    local item fam
    IFS=';' read -ra plan <<<"${BENCH_PLAN-}"
    for item in "${plan[@]}"; do
        fam=${item%%:*}
        # shellcheck disable=SC2086
        SITE=/tmp/site-b OUT=$OUT/bench-$fam DEVICE_DEADLINE_S=${BENCH_DEADLINE_S:-150} \
            FAMILIES=$fam CUDA_VISIBLE_DEVICES=$second bash scripts/device.sh bench -- ${item#*:} 2>&1 |
            tail -n 12
    done
}
export PYTEST_ARGS="-v -rfE --tb=short -p no:cacheprovider --durations=15" PYTEST_K=${PYTEST_K-cuda}
export OMP_NUM_THREADS=2 PACK_TRITON_CACHE=0 DEVICE_DEADLINE_S=${TESTS_DEADLINE_S:-300}
# Compile every kernel once, on all cores, before dozens of processes would each compile them.
SITE=/tmp/site-w OUT=$OUT/warm bash scripts/device.sh warm 2>&1 | grep -E "^warm|rror"
pids=()
if [[ ${TESTS:-1} == 1 ]]; then
    SITE=/tmp/site-t OUT=$OUT/tests DEMO=${DEMO:-0} PYTEST_TARGETS="${PYTEST_TARGETS:-tests \
        --ignore=tests/test_reliability.py -n ${TEST_WORKERS:-12}}" CUDA_VISIBLE_DEVICES=0 \
        bash scripts/device.sh tests >"$OUT/tests.log" 2>&1 &
    pids+=($!)
fi
if [[ ${TESTS:-1} == 1 && ${RELIABILITY:-1} == 1 ]]; then
    SITE=/tmp/site-r OUT=$OUT/reliability PYTEST_TARGETS=tests/test_reliability.py \
        CUDA_VISIBLE_DEVICES=0,$second bash scripts/device.sh tests >"$OUT/reliability.log" 2>&1 &
    pids+=($!)
fi
for fam in ${SANITIZE_FAMILIES-landmark}; do
    for tool in ${SANITIZE_TOOLS-memcheck racecheck}; do
        # SANITIZE_ONLY (a case-name substring) narrows the slow memcheck/racecheck runs only
        only=$([[ $tool == memcheck || $tool == racecheck ]] && echo "${SANITIZE_ONLY-}")
        SANITIZE_ONLY=$only SITE=/tmp/site-s-$fam-$tool OUT=$OUT/sanitize-$fam-$tool \
            SANITIZE_TOOLS=$tool FAMILIES=$fam \
            CUDA_VISIBLE_DEVICES=0 bash scripts/device.sh sanitize \
            >"$OUT/sanitize-$fam-$tool.log" 2>&1 &
        pids+=($!)
    done
done
bench_log=$OUT/bench.log
if ((gpus > 1)); then
    run_benches >"$bench_log" 2>&1 &
    pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
((gpus > 1)) || run_benches >"$bench_log" 2>&1
grep -h -E "^\[pytest.*((FAILED|ERROR) |E  +[A-Za-z]| passed| failed|[0-9.]+s (call|setup))" \
    "$OUT"/tests.log "$OUT"/reliability.log 2>/dev/null | cut -c1-260 | head -n 90
grep -h -E "^\[.*(SUMMARY|exit|ERROR|FAILED)" "$OUT"/sanitize-*.log 2>/dev/null | cut -c1-200 | head -n 60
cat "$bench_log"
tar -czf /tmp/logs.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/logs.tgz "$OUT/logs.tgz"
