"""The like-for-like tables of BENCHMARKS.md from scripts/bench_train.sh's JSON lines: one table
per option set, a row per trainer and shape, preftune against TRL from the newest pair of runs.
Usage: python3 scripts/bench_table.py runs/bench/train.jsonl"""
import json, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
latest = {}
for r in rows:
    latest[(r["options"], r["trainer"], r["shape"], r["impl"])] = r
for opts, title in (("f32", "f32 defaults on both sides"),
                    ("best", "bf16 + gradient checkpointing (+ DPO's precomputed reference) on both sides"),
                    ("bf16", "bf16 without checkpointing (+ DPO's precomputed reference) on both sides")):
    order = {"sft": 0, "dpo": 1, "rm": 2}
    keys = sorted({(t, s) for (o, t, s, i) in latest if o == opts}, key=lambda k: (order[k[0]], k[1] != "short"))
    if not keys:
        continue
    print(f"\n{title}\n")
    print("| trainer | shape | step (s) ours / TRL | ratio | whole process (s) ours / TRL | ratio | peak RSS (MiB) ours / TRL | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for t, s in keys:
        a, b = latest.get((opts, t, s, "preftune")), latest.get((opts, t, s, "trl"))
        if not (a and b):
            continue
        shape = f"{a['batch']} x {a['max_length']}"
        print(f"| {t} | {shape} | {a['median_step_s']:.2f} / {b['median_step_s']:.2f} | "
              f"**{a['median_step_s'] / b['median_step_s']:.2f}x** | {a['wall_s']:.1f} / {b['wall_s']:.1f} | "
              f"**{a['wall_s'] / b['wall_s']:.2f}x** | {a['peak_rss_mib']:,.0f} / {b['peak_rss_mib']:,.0f} | "
              f"**{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x** |")
