"""Per-kernel time over the last optimizer step of a cupti_trace.sh trace (between the last two
`lora_adamw` kernels), then one middle layer's kernels in order, in the forward and in the
backward (found by the attention kernels), each with its duration.

    python3 xtask/tools/kernel_sums.py TRACE.csv
"""
import collections, sys
acts = []
for line in open(sys.argv[1], errors='replace'):
    p = line.rstrip('\n').split(',', 4)
    if len(p) < 5 or p[0] != 'K': continue
    acts.append((int(p[1]), int(p[2]), p[4]))
acts.sort()
ad = [i for i, a in enumerate(acts) if 'lora_adamw' in a[2]]
if len(ad) < 2:
    sys.exit('kernel_sums: the trace holds %d optimizer steps (lora_adamw launches); run 2 or more' % len(ad))
step = acts[ad[-2] + 1:ad[-1] + 1]
busy = sum(e - s for s, e, n in step)
print('kernels %d, span %.2f ms, kernel time %.2f ms' % (len(step), (step[-1][1] - step[0][0]) / 1e6, busy / 1e6))
tot = collections.Counter(); cnt = collections.Counter()
for s, e, n in step: tot[n] += e - s; cnt[n] += 1
for n, t in tot.most_common(60): print('%8.2f ms %5d %8.1f us  %s' % (t / 1e6, cnt[n], t / cnt[n] / 1e3, n[:100]))
fw = [i for i, a in enumerate(step) if 'attn_forward' in a[2]]
dkv = [i for i, a in enumerate(step) if 'attn_dkv' in a[2] or 'attn_dk_' in a[2]]
def show(a, b):
    for s, e, n in step[max(a, 0):b]: print('%8.1f us  %s' % ((e - s) / 1e3, n[:100]))
if len(fw) > 6: print('--- forward, a middle layer'); show(fw[5] - 14, fw[6] - 14)
if len(dkv) > 9: print('--- backward, a middle layer'); show(dkv[8] - 50, dkv[9] - 50)
