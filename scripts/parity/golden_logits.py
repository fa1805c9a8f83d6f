"""Golden forward-pass values for the tiny models built by make_tiny_models.py.

Usage:  python scripts/parity/golden_logits.py MODELS_DIR OUT_DIR [NAME...]
Reads MODELS_DIR/NAME (default: tiny-llama, tiny-qwen2, tiny-gpt2); writes OUT_DIR/logits-NAME.json.

All values: float32 CPU forward, attn_implementation="eager", printed with 9 significant digits
(round-trips float32 exactly).  Logits are full vocabulary for every position.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The movie was good.",
    "A young director wanted to make a film about memory, and the actors worked well together.",
    "Last night we watched an old science fiction film at the cinema downtown. The special effects looked cheap, "
    "but the story was honest and the music was great. My sister laughed at the ending, and I bought popcorn twice!",
]
GEN_MESSAGES = [{"role": "user", "content": "Tell me about the film."}]
MAX_NEW = 16


def f9(t):
    """tensor -> nested lists of floats with 9 significant digits (exact for float32)."""
    a = t.detach().float().cpu().numpy()
    flat = [float("%.9g" % v) for v in a.ravel().tolist()]
    assert all(math.isfinite(v) for v in flat)
    return np.array(flat, dtype=object).reshape(a.shape).tolist() if a.ndim else flat[0]


def token_logprobs(logits, ids):
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return lp.gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def greedy(model, ids, n):
    ids = list(ids)
    out, gaps = [], []
    for _ in range(n):  # full recompute each step, no EOS stop
        last = model(torch.tensor([ids])).logits[0, -1]
        v = last.topk(2).values
        gaps.append((v[0] - v[1]).item())
        nxt = int(last.argmax())
        out.append(nxt)
        ids.append(nxt)
    return out, min(gaps)


@torch.no_grad()
def run(model_dir, name):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    pad = tok.pad_token_id
    res = dict(model=name, dtype="float32", attn_implementation="eager", torch=torch.__version__,
               transformers=transformers.__version__, vocab_size=model.config.vocab_size, pad_token_id=pad,
               logprob_convention="token_logprobs[i] = log_softmax(logits[i])[input_ids[i+1]], i = 0..T-2",
               cases=[])
    unbatched = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        t = torch.tensor([ids])
        logits = model(t).logits[0]
        lps = token_logprobs(logits, t[0])
        unbatched.append(logits)
        res["cases"].append(dict(text=text, input_ids=ids, num_tokens=len(ids), logits=f9(logits),
                                 token_logprobs=f9(lps), sum_logprob=f9(lps.sum())))
    # batched, LEFT padded; position_ids = clamp(cumsum(mask) - 1, min=0)
    seqs = [c["input_ids"] for c in res["cases"]]
    L = max(map(len, seqs))
    input_ids = torch.tensor([[pad] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    blogits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits
    rows, rows_lp, maxdiff = [], [], 0.0
    for i, s in enumerate(seqs):
        lg = blogits[i, L - len(s):]
        maxdiff = max(maxdiff, (lg - unbatched[i]).abs().max().item())
        rows.append(f9(lg))
        rows_lp.append(f9(token_logprobs(lg, torch.tensor(s))))
    res["batched_left_padded"] = dict(
        input_ids=input_ids.tolist(), attention_mask=mask.tolist(), position_ids=pos.tolist(),
        note="logits_nonpad[i] = logits at the attention_mask==1 positions of row i (same order as cases)",
        logits_nonpad=rows, token_logprobs_nonpad=rows_lp, max_abs_diff_vs_unbatched=maxdiff)
    # greedy generation from a chat prompt
    prompt = tok.apply_chat_template(GEN_MESSAGES, tokenize=False, add_generation_prompt=True)
    pids = tok(prompt, add_special_tokens=False)["input_ids"]
    new, gap = greedy(model, pids, MAX_NEW)
    hf = model.generate(torch.tensor([pids]), attention_mask=torch.ones(1, len(pids), dtype=torch.long),
                        do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=pad)
    hf_new = hf[0, len(pids):].tolist()
    assert hf_new == new[:len(hf_new)], (hf_new, new)
    res["greedy"] = dict(messages=GEN_MESSAGES, prompt_text=prompt, prompt_ids=pids, max_new_tokens=MAX_NEW,
                         stop_on_eos=False, new_token_ids=new, new_text=tok.decode(new),
                         hf_generate_kv_cache_agrees=hf_new == new,
                         min_top1_top2_logit_gap=gap)
    # sdpa vs eager, for the tolerance note in README (Gemma 2's soft-capping has no sdpa path)
    try:
        m2 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        res["max_abs_diff_eager_vs_sdpa"] = max((m2(torch.tensor([s])).logits[0] - u).abs().max().item()
                                                for s, u in zip(seqs, unbatched))
    except ValueError:
        res["max_abs_diff_eager_vs_sdpa"] = None
    return res


def main(models_dir, out_dir, names=()):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    for name in names or ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]:
        res = run(os.path.join(models_dir, name), name)
        path = os.path.join(out_dir, f"logits-{name}.json")
        with open(path, "w") as f:
            json.dump(res, f, separators=(",", ":"))
        back = json.load(open(path))
        assert back["cases"][2]["num_tokens"] > 40
        gr = res["greedy"]
        print(name, [c["num_tokens"] for c in back["cases"]], "batched diff",
              res["batched_left_padded"]["max_abs_diff_vs_unbatched"], "sdpa diff", res["max_abs_diff_eager_vs_sdpa"],
              "gen", gr["new_token_ids"], "hf agrees", gr["hf_generate_kv_cache_agrees"], "gap",
              gr["min_top1_top2_logit_gap"], os.path.getsize(path))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
