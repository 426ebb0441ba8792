#!/usr/bin/env bash
# fastllama GPU bundle: runs every CUDA test and benchmark in this folder on a GPU machine and
# prints a pass/fail/skip summary. Made by `cargo xtask gpu-bundle`; see docs/gpu-bundle.md.
# Arguments are passed to the test binaries (e.g. a test-name filter).
# Logs go to $OUT (the device tool's folder that comes back) or ./out: devices.txt, tests.log,
# benches.log, skipped.log.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
export LLAMA_FIXTURES="${LLAMA_FIXTURES:-$here/fixtures}"
export FASTLLAMA_CACHE="${FASTLLAMA_CACHE:-$here/cache}"
export FASTLLAMA_SKIP_LOG="$out/skipped.log"
export CRITERION_HOME="$here/criterion"
: > "$FASTLLAMA_SKIP_LOG"
: > "$out/tests.log"
: > "$out/benches.log"

# NVRTC and cuBLAS ship with the CUDA toolkit and with PyTorch's nvidia-* wheels.
extra_libs=$(python3 - 2>/dev/null <<'PY'
import glob, os, site
for s in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(s, "nvidia", "*", "lib")) + glob.glob(os.path.join(s, "nvidia", "lib"))):
        print(d)
PY
)
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $extra_libs; do
    [ -d "$dir" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir"
done
export LD_LIBRARY_PATH

"$here/bin/fastllama" devices 2>&1 | tee "$out/devices.txt"

passed=0; failed=0; ignored=0; broken=""
sum() { sed -nE "s/.* ([0-9]+) $1.*/\1/p" <<<"$2"; }
for t in "$here"/tests/*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    echo "== test $name" | tee -a "$out/tests.log"
    log=$("$t" "$@" 2>&1)
    status=$?
    echo "$log" >> "$out/tests.log"
    grep -E '^test .* \.\.\. ' <<<"$log" || true
    [ "$status" -eq 0 ] || sed -n '/^failures:$/,/^test result:/p' <<<"$log" | head -80
    line=$(grep -E '^test result:' <<<"$log" | tail -n 1)
    echo "$line"
    passed=$((passed + $(sum passed "$line" || echo 0)))
    failed=$((failed + $(sum failed "$line" || echo 0)))
    ignored=$((ignored + $(sum ignored "$line" || echo 0)))
    [ "$status" -eq 0 ] || broken="$broken $name"
done

for b in "$here"/benches/*; do
    [ -x "$b" ] || continue
    name=$(basename "$b")
    echo "== bench $name" | tee -a "$out/benches.log"
    "$b" --bench 2>&1 | tee -a "$out/benches.log" | grep -E 'time:|thrpt:|^[a-z]' || true
    [ "${PIPESTATUS[0]}" -eq 0 ] || broken="$broken $name"
done

# `gpu-bundle --experiments`: the GPU experiments, JSON and pages into $out/experiments.
if [ -x "$here/bin/fastllama-experiments" ]; then
    for e in long-context kv-cache; do
        echo "== experiment $e" | tee -a "$out/experiments.log"
        "$here/bin/fastllama-experiments" "$e" --device cuda ${FASTLLAMA_EXPERIMENT_ARGS:-} \
            --root "$here" --data "$out/experiments" --docs "$out/experiments/pages" \
            2>&1 | tee -a "$out/experiments.log" | grep -v '^\s*$' | tail -n 3
        [ "${PIPESTATUS[0]}" -eq 0 ] || broken="$broken experiment-$e"
    done
fi

skipped=$(grep -c . "$FASTLLAMA_SKIP_LOG" || true)
echo "skipped: no CUDA device: $skipped"
[ -z "$broken" ] || echo "failing binaries:$broken"
echo "gpu-bundle: $((passed - skipped)) passed, $failed failed, $skipped skipped"
[ -z "$broken" ] && [ "$failed" -eq 0 ]
