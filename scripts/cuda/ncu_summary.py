#!/usr/bin/env python3
"""Summarise `ncu --csv --metrics gpu__time_duration.sum`: kernel time by name, and in launch order by phase."""
import csv, sys, collections
rows = []
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    try:
        v = float(r["Metric Value"].replace(",", ""))
    except ValueError:
        continue
    rows.append((int(r["ID"]), r["Kernel Name"], v / 1e6, r.get("Grid Size", ""), r.get("Block Size", "")))
rows.sort()
total = sum(r[2] for r in rows)
print(f"{len(rows)} kernels, {total:.2f} ms in all")
agg = collections.defaultdict(lambda: [0.0, 0])
for _, name, ms, _, _ in rows:
    key = name.split("(")[0][:100]
    agg[key][0] += ms; agg[key][1] += 1
for k, (ms, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:45]:
    print(f"{ms:9.3f} ms {n:5d}x  {k}")
# phases: cumulative time per 200 launches, to see where the text encoder / U-Net / VAE sit
print("-- by launch order (200 per line)")
for i in range(0, len(rows), 200):
    chunk = rows[i:i + 200]
    top = collections.Counter()
    for _, name, ms, _, _ in chunk:
        top[name.split("(")[0][:40]] += ms
    print(f"{i:5d}: {sum(r[2] for r in chunk):8.3f} ms  " + ", ".join(f"{k} {v:.2f}" for k, v in top.most_common(3)))
