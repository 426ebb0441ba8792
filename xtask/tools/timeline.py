"""The last two training steps of a cupti_trace.sh trace (between the third-last and the last
`lora_adamw` kernel): how busy the compute stream was, its idle time by gap size and by what
came after the gap, the largest gaps with the driver calls the host was in during them (traces
taken with --api), and the host copies' rates.

    python3 xtask/tools/timeline.py TRACE.csv
"""
import collections
import signal
import sys

signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
acts, api = [], []
for line in open(sys.argv[1], errors='replace'):
    p = line.rstrip('\n').split(',', 4)
    if len(p) < 5: continue
    kind, s, e, st, rest = p[0], int(p[1]), int(p[2]), int(p[3]), p[4]
    (api if kind == 'D' else acts).append((s, e, kind, st, rest))
acts.sort(); api.sort()
ad = [a for a in acts if a[2] == 'K' and 'adamw' in a[4]]
print('activities', len(acts), 'api calls', len(api), 'adamw', len(ad))
if len(ad) < 3:
    sys.exit('timeline: the trace holds %d optimizer steps (lora_adamw launches); run 3 or more' % len(ad))
t0, t1 = ad[-3][1], ad[-1][1]
streams = collections.Counter(a[3] for a in acts if a[2] == 'K' and t0 <= a[0] < t1)
main = streams.most_common(1)[0][0]
print('kernel streams', dict(streams), 'main', main)
win = [a for a in acts if t0 <= a[0] and a[1] <= t1 and a[3] == main]
busy, last, gaps = 0, t0, []
for s, e, k, st, nm in win:
    if s > last: gaps.append((s - last, last, k + ' ' + nm[:70]))
    busy += max(0, e - max(s, last)); last = max(last, e)
span = t1 - t0
print('2 steps: %.2f ms, main stream busy %.2f ms (%.1f%%), idle %.2f ms in %d gaps' % (span / 1e6, busy / 1e6, 100 * busy / span, (span - busy) / 1e6, len(gaps)))
hist = collections.Counter()
for g, at, nm in gaps:
    b = 'a <2us' if g < 2e3 else 'b 2-5us' if g < 5e3 else 'c 5-20us' if g < 2e4 else 'd 20-100us' if g < 1e5 else 'e >100us'
    hist[b] += g
print('idle by gap size (ms):', {k: round(v / 1e6, 2) for k, v in sorted(hist.items())})
nxt = collections.Counter()
for g, at, nm in gaps:
    if g >= 5e3: nxt[nm.split('(')[0][:50]] += g
print('idle (gaps >= 5us) before (ms):', [(k, round(v / 1e6, 2)) for k, v in nxt.most_common(12)])
gaps.sort(reverse=True)
for g, at, nm in gaps[:12]:
    during = collections.Counter()
    for s, e, k, th, name in api:
        if s < at + g and e > at: during[name] += min(e, at + g) - max(s, at)
    print('gap %8.1f us at +%7.2f ms before %-50s host: %s' % (g / 1e3, (at - t0) / 1e6, nm[:50], [(k, round(v / 1e3)) for k, v in during.most_common(3)]))
# host: driver time per call type in the window
tot = collections.Counter(); cnt = collections.Counter()
for s, e, k, th, name in api:
    if t0 <= s < t1: tot[name] += e - s; cnt[name] += 1
print('driver calls in window (ms, count):', [(k, round(v / 1e6, 2), cnt[k]) for k, v in tot.most_common(10)])
# copies
for kind in ('M1', 'M2'):
    cs = [a for a in acts if a[2] == kind and t0 <= a[0] < t1]
    if cs:
        b = sum(int(a[4]) for a in cs); t = sum(a[1] - a[0] for a in cs)
        print('%s: %d copies, %.0f MiB, %.2f ms busy, %.1f GB/s' % ({'M1': 'HtoD', 'M2': 'DtoH'}[kind], len(cs), b / 2**20, t / 1e6, b / t if t else 0))
