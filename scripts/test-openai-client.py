"""`preftune serve` against the official `openai` Python client, curl and a load test.

Run by scripts/test-openai-client.sh, which starts the server; prints one JSON line of results and
exits non-zero on the first failed check.
  python scripts/test-openai-client.py BASE_URL API_KEY [--clients 32] [--max-tokens 16]
"""
import argparse
import concurrent.futures as cf
import json
import subprocess
import time

import openai

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("key")
ap.add_argument("--clients", type=int, default=32)
ap.add_argument("--max-tokens", type=int, default=16)
a = ap.parse_args()

client = openai.OpenAI(base_url=a.base, api_key=a.key, max_retries=0)
model = client.models.list().data[0].id
out = {"model": model}

# Chat: a whole answer, then the same request streamed gives the same text.
msgs = [{"role": "user", "content": "Name three colours."}]
r = client.chat.completions.create(model=model, messages=msgs, temperature=0,
                                   max_tokens=a.max_tokens, logprobs=True, top_logprobs=3)
text = r.choices[0].message.content
assert r.choices[0].finish_reason in ("stop", "length"), r
assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)
parts = []
for chunk in client.chat.completions.create(model=model, messages=msgs, temperature=0,
                                            max_tokens=a.max_tokens, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == text, (parts, text)
out["chat"] = text

# n, seed and stop on the completions route.
c = client.completions.create(model=model, prompt="The capital of France is", n=3, seed=7,
                              temperature=1.0, max_tokens=a.max_tokens, logprobs=2)
again = client.completions.create(model=model, prompt="The capital of France is", n=3, seed=7,
                                  temperature=1.0, max_tokens=a.max_tokens, logprobs=2)
assert [x.text for x in c.choices] == [x.text for x in again.choices]
assert len(c.choices) == 3 and c.choices[0].logprobs.token_logprobs
g = client.completions.create(model=model, prompt="The capital of France is", temperature=0,
                              max_tokens=a.max_tokens)
full = g.choices[0].text
if len(full) > 6:
    stop = full[3:5]
    s = client.completions.create(model=model, prompt="The capital of France is",
                                  temperature=0, max_tokens=a.max_tokens, stop=[stop])
    assert s.choices[0].text == full[: full.find(stop)] and s.choices[0].finish_reason == "stop"

# Errors arrive as the client's exception types.
try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=10**7)
    raise AssertionError("max_tokens over the limit was accepted")
except openai.BadRequestError:
    pass
try:
    openai.OpenAI(base_url=a.base, api_key="wrong-key-0123456789", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass

# curl, as a shell user would call it.
cr = subprocess.run(["curl", "-sf", f"{a.base}/chat/completions", "-H", f"Authorization: Bearer {a.key}",
                     "-H", "Content-Type: application/json", "-d",
                     json.dumps({"model": model, "messages": msgs, "temperature": 0,
                                 "max_tokens": a.max_tokens})], capture_output=True, text=True, check=True)
assert json.loads(cr.stdout)["choices"][0]["message"]["content"] == text

# Load: distinct greedy prompts, sequentially and from concurrent clients; every client must get
# the answer it gets alone.
prompts = [f"Write one sentence about the number {i}." for i in range(a.clients)]


def ask(p):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                       temperature=0, max_tokens=a.max_tokens)
    return r.choices[0].message.content, r.usage.completion_tokens


t = time.perf_counter()
alone = [ask(p) for p in prompts]
seq_s = time.perf_counter() - t
t = time.perf_counter()
with cf.ThreadPoolExecutor(a.clients) as ex:
    together = list(ex.map(ask, prompts))
conc_s = time.perf_counter() - t
wrong = sum(x[0] != y[0] for x, y in zip(alone, together))
tokens = sum(x[1] for x in together)
out.update({"clients": a.clients, "max_tokens": a.max_tokens, "tokens": tokens,
            "sequential_s": round(seq_s, 2), "concurrent_s": round(conc_s, 2),
            "sequential_tok_s": round(tokens / seq_s, 1), "concurrent_tok_s": round(tokens / conc_s, 1),
            "speedup": round(seq_s / conc_s, 2), "answers_differing": wrong})
print(json.dumps(out))
assert wrong == 0, f"{wrong} concurrent answers differ from the same request alone"
