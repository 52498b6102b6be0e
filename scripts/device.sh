#!/usr/bin/env bash
# The one project script for the GPU machine (the device tool), run from the repo root:
#
#   bash scripts/device.sh [warm] [tests] [sanitize] [bench] [-- BENCH_ARGS...]  (default: the last three)
#
# carry: dist (the longattn wheel, built here with maturin), .whl (peer wheels: fla-core,
# lightning-attn), .peers (Python sources of the official FSA, NSA-reference, RAT and landmark
# code, for the benches) and, when you have it, .triton-cache (unpacked from a previous
# triton-cache.tgz).
# Results land in $OUT: summary.txt, pytest-<i>.log, sanitizer.log, bench_<family>.log and .json per
# family, triton-cache.tgz (Triton's compile and autotune cache, to unpack into .triton-cache/ and
# carry next time: fla autotunes 35-50 s per head count/head dim otherwise).
#
# Environment (all optional):
#   DEVICE_DEADLINE_S  seconds this script may take in all (default 560, under the tool's 600);
#                      each stage gets what is left, the bench stops starting measurements in time
#   FAMILIES           which families' sanitize_<f>.py / bench_<f>.py run (default
#                      "lightning rat landmark nsa nsa_selection"; missing scripts are skipped)
#   BENCH_FAMILIES     the benches to run, if not those of FAMILIES
#   DEMO               1: also run `python -m longattn demo` on the GPU (in the background while
#                      the tests run; demo.log and mqar-<gpu>.png in $OUT)
#   SITE               where the wheels are installed (default /tmp/site)
#   PYTEST_ARGS        default "-x -q"
#   PYTEST_TARGETS     default "tests" (test files or node ids); ";" separates shards that run
#                      at once, each logging to $OUT/pytest-<i>.log
#   PYTEST_K           a pytest -k expression
#   TESTS_MAX_S        at most this many seconds for the tests stage
#   SANITIZE_TOOLS     default "memcheck racecheck" (also: initcheck synccheck)
#   SANITIZE_ARGS      extra compute-sanitizer options, e.g. "--kernel-name kns=la_" (check only
#                      longattn's kernels, if torch's own make it too slow)
#   BENCH_RESUME_FROM  a previous bench_lightning.json (copied into the tree): the bench copies it
#                      to $OUT and measures only what it lacks or skipped (--resume)
#   PACK_TRITON_CACHE  0 to skip writing triton-cache.tgz
#   LONGATTN_NVRTC     12 or 13: the NVRTC major version that compiles the kernels (default:
#                      torch's); 12 beside a CUDA 13 torch needs the nvidia-cuda-nvrtc-cu12 wheel
#                      carried in .whl
#
# A first full run (fla autotuning, NVRTC compiles) can exceed one call: run `tests sanitize` and
# `bench` as two calls, or rerun `bench` with the cache from the first.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
T0=$SECONDS
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
DEADLINE=${DEVICE_DEADLINE_S:-560}
FAMILIES=${FAMILIES:-lightning rat landmark nsa nsa_selection}
export PYTHONUNBUFFERED=1

stages=()
bench_args=()
while (($#)); do
    case $1 in
        warm | tests | sanitize | bench) stages+=("$1") ;;
        all) stages+=(tests sanitize bench) ;;
        --)
            shift
            bench_args=("$@")
            break
            ;;
        *)
            echo "usage: bash scripts/device.sh [warm] [tests] [sanitize] [bench] [-- BENCH_ARGS...]" >&2
            exit 2
            ;;
    esac
    shift
done
((${#stages[@]})) || stages=(tests sanitize bench)

declare -A RC SECS NOTE
order=()
record() { # stage rc seconds note
    order+=("$1")
    RC[$1]=$2
    SECS[$1]=$3
    NOTE[$1]=${4:-}
}
left() { echo $((DEADLINE - (SECONDS - T0))); }

echo "== device.sh: stages ${stages[*]}; deadline ${DEADLINE}s; OUT=$OUT"
nvidia-smi -L || echo "nvidia-smi failed"

# -- install: the longattn wheel and the peer wheels, into one target ---------------------------
t=$SECONDS
SITE=${SITE:-/tmp/site}
rm -rf "$SITE"
mkdir -p "$SITE"
shopt -s nullglob
wheels=()
install_note=""
# shellcheck disable=SC2012  # newest wheel first
longattn_whl=$(ls -t dist/longattn-*.whl 2>/dev/null | head -n 1)
if [[ -n $longattn_whl ]]; then
    wheels+=("$longattn_whl")
else
    install_note="no dist/longattn-*.whl (build it and carry dist)"
fi
peer_whls=(.whl/*.whl)
((${#peer_whls[@]})) || install_note+="${install_note:+; }no .whl/*.whl (carry .whl): peers will fail to import"
wheels+=("${peer_whls[@]}")
install_rc=0
if ((${#wheels[@]})); then
    echo "installing: ${wheels[*]}"
    python3 -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --target "$SITE" \
        "${wheels[@]}"
    install_rc=$?
fi
[[ -z $longattn_whl ]] && install_rc=1
record install "$install_rc" $((SECONDS - t)) "$install_note"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

mkdir -p .triton-cache
export TRITON_CACHE_DIR=$PWD/.triton-cache
export TRITON_CACHE_AUTOTUNING=1
export LONGATTN_CACHE_DIR=/tmp/longattn-cache
echo "TRITON_CACHE_DIR=$TRITON_CACHE_DIR ($(find .triton-cache -type f | wc -l) files carried in)"

python3 - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
try:
    import longattn
    why = getattr(longattn, "cuda_unavailable_reason", lambda: None)()
    print("longattn", getattr(longattn, "__version__", "?"), longattn.__file__,
          "| CUDA kernels:", why or "available")
    try:
        from longattn import _runtime
        print("NVRTC %s %d.%d" % _runtime.nvrtc_library())
    except Exception as e:
        print("NVRTC:", type(e).__name__, e)
except Exception as e:
    print("longattn import failed:", type(e).__name__, e)
EOF

demo_pid=""
if [[ ${DEMO:-0} == 1 ]]; then
    python3 -m longattn demo --device cuda --png "$OUT/mqar-h200.png" >"$OUT/demo.log" 2>&1 &
    demo_pid=$!
fi

# -- stages ----------------------------------------------------------------------------------------
stage_budget() { # seconds a stage may run: what is left, less a reserve for packing and summary
    local b=$(($(left) - 30))
    ((b > 0)) && echo "$b" || echo 0
}

run_warm() { # every kernel variant compiled for this GPU into the disk cache, on all cores at once
    python3 - <<'PY'
import time

import torch
from longattn import _native, _runtime

_runtime._preload_nvrtc()
major, minor = torch.cuda.get_device_capability()
arch = f"sm_{major}{minor}" + ("a" if major == 9 else "")
t = time.time()
built = _native.compile_all_kernels(arch)
print(f"warm: {len(built)} variants for {arch} in {time.time() - t:.1f}s")
PY
}

run_tests() { # PYTEST_TARGETS may hold ';'-separated shards, run at once (one GPU, many CPUs)
    local b i=0 rc=0 shard
    local -a pids=()
    b=$(stage_budget)
    ((b > ${TESTS_MAX_S:-100000})) && b=$TESTS_MAX_S
    ((b >= 20)) || return 124
    IFS=';' read -ra shards <<<"${PYTEST_TARGETS:-tests}"
    for shard in "${shards[@]}"; do
        # shellcheck disable=SC2086
        timeout -k 10 "$b" python3 -m pytest ${PYTEST_ARGS:--x -q} ${PYTEST_K:+-k "$PYTEST_K"} \
            $shard >"$OUT/pytest-$i.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || rc=$?
        tail -n 25 "$OUT/pytest-$i.log" | sed "s/^/[pytest-$i] /"
    done
    return "$rc"
}

find_sanitizer() {
    local c
    for c in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
        /opt/nvidia/*/compute-sanitizer /opt/nvidia/*/*/compute-sanitizer; do
        [[ -n $c && -x $c ]] && {
            echo "$c"
            return 0
        }
    done
    return 1
}

# Only longattn's kernels are checked (torch's own would make racecheck take minutes).
declare -A KERNEL_PREFIX=([engine]=_sm90 [lightning]=la_ [rat]=rat_ [landmark]=lm_ [nsa]=nsa_ [nsa_selection]=nsa_)

run_sanitize() {
    local cs log=$OUT/sanitizer.log rc=0 r tool b f script
    local -a filter
    : >"$log"
    if ! cs=$(find_sanitizer); then
        echo "compute-sanitizer not found" | tee -a "$log"
        return 127
    fi
    for f in $FAMILIES; do
        script=benchmarks/sanitize_$f.py
        [[ -f $script ]] || continue
        for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
            b=$(stage_budget)
            if ((b < 20)); then
                echo "=== $f $tool: no time left" | tee -a "$log"
                rc=124
                continue
            fi
            echo "=== $cs --tool $tool python3 $script" | tee -a "$log"
            # initcheck must instrument every kernel: writes by torch's kernels it does not watch
            # would leave our inputs looking uninitialised.
            filter=(--kernel-name "kns=${KERNEL_PREFIX[$f]:-}")
            [[ $tool == initcheck ]] && filter=()
            # shellcheck disable=SC2086
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$b" "$cs" --tool "$tool" \
                --error-exitcode 86 "${filter[@]}" \
                ${SANITIZE_ARGS:-} python3 "$script" \
                >"/tmp/sanitize-$f-$tool.log" 2>&1
            r=$?
            cat "/tmp/sanitize-$f-$tool.log" >>"$log"
            echo "=== $f $tool exit $r" >>"$log"
            grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^case |sanitize_|Error|error" \
                "/tmp/sanitize-$f-$tool.log" | tail -n 14 | sed "s/^/[$f $tool] /"
            echo "[$f $tool] exit $r (86: the sanitizer found errors)"
            ((r != 0)) && rc=$r
        done
    done
    return "$rc"
}

run_bench() { # each family's bench gets an equal share of what is left
    local b f n=0 rc=0 r share resume=()
    for f in ${BENCH_FAMILIES:-$FAMILIES}; do [[ -f benchmarks/bench_$f.py ]] && n=$((n + 1)); done
    for f in ${BENCH_FAMILIES:-$FAMILIES}; do
        [[ -f benchmarks/bench_$f.py ]] || continue
        b=$(($(stage_budget) - 20))
        share=$((b / n))
        n=$((n - 1))
        if ((share < 30)); then
            echo "bench_$f: no time left"
            rc=124
            continue
        fi
        resume=()
        if [[ $f == lightning && -n ${BENCH_RESUME_FROM:-} ]]; then
            cp "$BENCH_RESUME_FROM" "$OUT/bench_lightning.json" && resume=(--resume)
        fi
        echo "== bench_$f ($share s)"
        timeout -k 10 $((share + 45)) python3 "benchmarks/bench_$f.py" --out "$OUT/bench_$f.json" \
            --budget-s "$share" ${resume[@]+"${resume[@]}"} ${bench_args[@]+"${bench_args[@]}"} 2>&1 |
            tee "$OUT/bench_$f.log"
        r=${PIPESTATUS[0]}
        ((r != 0)) && rc=$r
    done
    return "$rc"
}

for s in "${stages[@]}"; do
    echo
    echo "======== stage $s ($(left)s left) ========"
    t=$SECONDS
    case $s in
        warm) run_warm ;;
        tests) run_tests ;;
        sanitize) run_sanitize ;;
        bench) run_bench ;;
    esac
    rc=$?
    note=""
    ((rc == 124)) && note="out of time (deadline ${DEADLINE}s)"
    record "$s" "$rc" $((SECONDS - t)) "$note"
done

if [[ -n $demo_pid ]]; then
    wait "$demo_pid"
    record demo $? 0 "runs beside the tests: its tokens/s are not clean timings"
    tail -n 15 "$OUT/demo.log"
fi

# -- Triton cache back to the caller ---------------------------------------------------------------
if [[ ${PACK_TRITON_CACHE:-1} != 0 ]] && [[ -n $(find .triton-cache -type f -print -quit) ]]; then
    kb=$(du -sk .triton-cache | cut -f1)
    rm -f "$OUT/triton-cache.tgz"
    what="whole cache (${kb} KiB)"
    if ((kb <= 32768)); then
        tar -C .triton-cache -czf "$OUT/triton-cache.tgz" .
    fi
    if [[ ! -f $OUT/triton-cache.tgz ]] || (($(stat -c %s "$OUT/triton-cache.tgz") > 15 * 1024 * 1024)); then
        (cd .triton-cache && find . -name '*.autotune.json' -print0 | tar --null -czf "$OUT/triton-cache.tgz" -T -)
        what="autotune results only (whole cache ${kb} KiB is too big)"
    fi
    echo "triton-cache.tgz: $what, $(stat -c %s "$OUT/triton-cache.tgz") bytes;" \
        "next time: mkdir -p .triton-cache && tar -xzf triton-cache.tgz -C .triton-cache, carry .triton-cache"
fi

# -- summary ---------------------------------------------------------------------------------------
fail=0
{
    echo
    echo "======== summary ($((SECONDS - T0))s) ========"
    printf '%-10s %5s %8s  %s\n' stage rc seconds note
    for s in "${order[@]}"; do
        printf '%-10s %5s %8s  %s\n' "$s" "${RC[$s]}" "${SECS[$s]}" "${NOTE[$s]}"
    done
    # shellcheck disable=SC2012
    echo "files in OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} | tee "$OUT/summary.txt"
for s in "${order[@]}"; do [[ ${RC[$s]} == 0 ]] || fail=1; done
exit "$fail"
