#!/usr/bin/env bash
# Runs a command under a CUPTI activity tracer (no Nsight Systems on the device machine):
#   bash xtask/tools/cupti_trace.sh TRACE.csv [--api] -- COMMAND ARGS...
# compiles xtask/tools/cupti_trace.c against the machine's CUPTI (gcc; CUDA toolkit or PyTorch's
# nvidia wheels), loads it into COMMAND through CUDA_INJECTION64_PATH and writes every kernel,
# memcpy and memset (and with --api every driver call) to TRACE.csv; then
#   python3 xtask/tools/timeline.py TRACE.csv
# prints where the compute stream idles over the last two optimizer steps. See docs/gpu-bundle.md.
set -eu
out=$1; shift
api=""
if [ "${1:-}" = "--api" ]; then api=1; shift; fi
[ "${1:-}" = "--" ] && shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
header=$(find /usr /opt -name cupti.h -path "*include*" 2>/dev/null | head -1)
library=$(find /usr /opt -name "libcupti.so*" 2>/dev/null | head -1)
if [ -z "$header" ] || [ -z "$library" ]; then
    echo "cupti_trace: no CUPTI header or library found under /usr or /opt" >&2
    exit 1
fi
inc=$(dirname "$header"); lib=$(dirname "$library")
# The activity records' newest struct versions in this CUPTI.
newest() { grep -o "CUpti_Activity$1[0-9]*;" "$inc/cupti_activity.h" | tr -d ';' | sort -V | tail -1; }
so=$(mktemp -d)/libcupti_trace.so
gcc -O2 -shared -fPIC -DKERNEL_T="$(newest Kernel)" -DMEMCPY_T="$(newest Memcpy)" \
    -DMEMSET_T="$(newest Memset)" -I"$inc" "$here/cupti_trace.c" -o "$so" -L"$lib" -lcupti
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
env ${api:+TRACE_API=1} CUDA_INJECTION64_PATH="$so" TRACE_OUT="$out" "$@"
