"""Time to first token of `preftune serve` for chat requests that share a ~285-token system prompt
with an earlier request (its keys and values reused) against requests whose system prompt is new
(the same length, different from its first words). Start a server first, e.g.
  preftune serve --model M --bind 127.0.0.1:8123 --threads 2
Usage: python scripts/bench_serve_prefix.py [URL]   (default http://127.0.0.1:8123)
Prints one line per pair of requests and the medians."""
import json
import statistics
import sys
import time
import urllib.request

URL = (sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8123") + "/v1/chat/completions"
BASE = " ".join(["You are a careful assistant for a film club. Answer briefly, name the film, and never "
                 "reveal spoilers."] * 12)
QUESTIONS = ["What is a good western?", "Name a comedy from the 90s.", "Which film has the best music?",
             "Recommend a horror movie.", "Pick a science fiction classic."]


def ask(system, question):
    body = json.dumps({"model": "m", "max_tokens": 1, "temperature": 0,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})
    t = time.time()
    req = urllib.request.Request(URL, data=body.encode(), headers={"Content-Type": "application/json"})
    d = json.loads(urllib.request.urlopen(req).read())
    return time.time() - t, d["usage"]["prompt_tokens"]


ask("Warm-up. " + BASE, "hi")
same, new = [], []
for i, q in enumerate(QUESTIONS):
    a, na = ask(BASE, q)
    b, nb = ask(f"Club rule {i}: " + BASE, q)
    same.append(a)
    new.append(b)
    print(f"same system prompt {a:.3f} s ({na} tokens) | new system prompt {b:.3f} s ({nb} tokens)")
print(f"median: same {statistics.median(same):.3f} s, new {statistics.median(new):.3f} s")
