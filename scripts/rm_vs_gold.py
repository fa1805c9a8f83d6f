"""How far a reward model agrees with the gold judge on held-out samples of an IMDb run.

Usage: python3 scripts/rm_vs_gold.py RUN_DIR RM_DIR
Scores the held-out rankings (RUN_DIR/pairs/rankings-eval.jsonl) and the SFT evaluation samples
(RUN_DIR/samples-sft.jsonl) with `preftune score --reward model:RM_DIR` and prints one JSON line:
Pearson and Spearman correlation with gold, accuracy on same-prompt pairs, and on pairs whose gold
gap exceeds 2. Needs target/release/preftune (PREFTUNE to override).
"""
import json, subprocess, sys, math, os, itertools, tempfile
run, rm = sys.argv[1], sys.argv[2]
rows = []
for l in open(f"{run}/pairs/rankings-eval.jsonl"):
    r = json.loads(l)
    for resp, s in zip(r["responses"], r["scores"]):
        rows.append({"prompt": r["prompt"], "response": resp, "gold": s})
if os.path.exists(f"{run}/samples-sft.jsonl"):
    for l in open(f"{run}/samples-sft.jsonl"):
        r = json.loads(l)
        g = r.get("gold", r.get("gold_reward"))
        if g is None:
            g = [v for k, v in r.items() if "gold" in k][0]
        rows.append({"prompt": r["prompt"], "response": r["response"], "gold": g})
tmp = tempfile.mkdtemp(prefix="rm-vs-gold-")
inp, out = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "scored.jsonl")
open(inp, "w").write("\n".join(json.dumps(r) for r in rows) + "\n")
bin_ = os.environ.get("PREFTUNE", os.path.join(os.path.dirname(__file__), "..", "target/release/preftune"))
subprocess.run([bin_, "score", "--reward", f"model:{rm}", "--data", inp, "--out", out], check=True, capture_output=True)
sc = [json.loads(l) for l in open(out)]
g = [r["gold"] for r in sc]; p = [r["reward"] for r in sc]
def pear(a, b):
    ma, mb = sum(a)/len(a), sum(b)/len(b)
    c = sum((x-ma)*(y-mb) for x, y in zip(a, b)); return c / math.sqrt(sum((x-ma)**2 for x in a) * sum((y-mb)**2 for y in b))
def rank(a):
    o = sorted(range(len(a)), key=lambda i: a[i]); r = [0]*len(a)
    for k, i in enumerate(o): r[i] = k
    return r
by = {}
for r in sc: by.setdefault(r["prompt"], []).append(r)
acc = [0, 0]; big = [0, 0]
for rs in by.values():
    for a, b in itertools.combinations(rs, 2):
        if a["gold"] == b["gold"]: continue
        ok = (a["gold"] > b["gold"]) == (a["reward"] > b["reward"])
        acc[0] += ok; acc[1] += 1
        if abs(a["gold"] - b["gold"]) > 2: big[0] += ok; big[1] += 1
print(json.dumps({"rm": rm, "n": len(sc), "pearson": round(pear(g, p), 3), "spearman": round(pear(rank(g), rank(p)), 3),
                  "pair_acc": round(acc[0]/max(acc[1],1), 3), "pairs": acc[1], "big_gap_acc": round(big[0]/max(big[1],1), 3), "big_pairs": big[1]}))
