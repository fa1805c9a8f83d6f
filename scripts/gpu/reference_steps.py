"""The PyTorch + transformers side of the GPU timing table, on the same GPU, data and shapes as
preftune: TRL's own step maths written out in PyTorch (TRL is not installed on the GPU machine):
  sft  MODEL DATA BATCH MAXLEN STEPS   completion-only NLL (TRL's SFT loss), backward, AdamW step
  dpo  MODEL DATA BATCH MAXLEN STEPS   sigmoid DPO loss, beta 0.1, reference log-probs precomputed
                                       (TRL's precompute_ref_log_probs), chosen and rejected in one
                                       concatenated forward (TRL's default), backward, AdamW step
  generate MODEL PROMPTS BATCH NEW     sampling at T=1, fixed length, HF generate
  grpo MODEL PROMPTS P N NEW STEPS     a GRPO iteration as GRPOTrainer runs it without vLLM: P prompts
                                       x N samples at T=1 up to NEW tokens in one HF generate call,
                                       digits in the completion as the reward, group-normalised
                                       advantages, beta 0, one iteration (ratio 1), DAPO's token-mean
                                       loss, backward, clipping at 1.0, AdamW step
BF16=1: TRL's bf16=True (f32 master weights, autocast to bf16). GC=1: gradient checkpointing.
CB=1 (generate, grpo): transformers' continuous batching (`generate_batch`, paged attention), as
GRPOTrainer's `use_transformers_continuous_batching=True` runs it (max_memory_percent 0.5, the
model cast to bf16 under BF16=1), instead of `generate` on a left-padded batch.
DEV=cpu runs on the CPU (a rehearsal of the script; default cuda).
Prints one JSON line: median step seconds over the steps after two warm-up steps, tokens/s and
torch's peak allocated memory (on a GPU)."""
import json, os, statistics, sys, time
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
bf16 = os.environ.get("BF16") == "1"
gc = os.environ.get("GC") == "1"
work, model_dir, data = sys.argv[1:4]
dev = os.environ.get("DEV", "cuda")
cuda = dev.startswith("cuda")
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(dev)
rows = [json.loads(l) for l in open(data) if l.strip()]


def sync():
    if cuda:
        torch.cuda.synchronize()


def peak_mib():
    return torch.cuda.max_memory_allocated() / 2**20 if cuda else None


cb = os.environ.get("CB") == "1"


def generate_batch(prompt_ids, new, eos, m=None):
    """transformers' continuous batching, as GRPOTrainer calls it: the new tokens of each prompt."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                           pad_token_id=tok.pad_token_id, eos_token_id=eos)
    out = (m or model).generate_batch(prompt_ids, generation_config=gen,
                               continuous_batching_config=ContinuousBatchingConfig(max_memory_percent=0.5),
                               progress_bar=False)
    return [o.generated_tokens for o in out.values()]


if work == "generate":
    batch, new = int(sys.argv[4]), int(sys.argv[5])
    model.eval()
    if bf16:
        model = model.to(torch.bfloat16)
    tok.padding_side = "left"
    prompts = [rows[i % len(rows)]["prompt"] for i in range(batch)]
    if cb:
        # No EOS: every row makes `new` tokens, as min_new_tokens does below.
        ids = [tok(p)["input_ids"] for p in prompts]
        with torch.no_grad():
            generate_batch(ids, 4, None)
            sync(); t = time.perf_counter()
            toks = generate_batch(ids, new, None)
            sync(); s = time.perf_counter() - t
        n = sum(len(x) for x in toks)
    else:
        enc = tok(prompts, return_tensors="pt", padding=True).to(dev)
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=4, min_new_tokens=4, **kw)
            sync(); t = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, **kw)
            sync(); s = time.perf_counter() - t
        n = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    print(json.dumps({"impl": "transformers" + (" generate_batch" if cb else ""), "workload": "generate",
                      "bf16": bf16, "batch": batch, "new_tokens": new, "seconds": s, "tokens_per_s": n / s,
                      "torch": torch.__version__, "peak_allocated_mib": peak_mib()}))
    sys.exit(0)

if work == "grpo":
    n_prompts, n, new, steps = map(int, sys.argv[4:8])
    tok.padding_side = "left"
    model.config.use_cache = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, pad_token_id=tok.pad_token_id)
    # With CB=1 the sampler is a copy of the policy (bf16 under BF16=1), its weights synced before
    # every generation: the master weights stay f32 as on preftune's side.
    sampler = None
    if cb:
        import copy
        sampler = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32).eval()
    times, tokens = [], []
    for step in range(steps + 1):
        prompts = [rows[(step * n_prompts + k) % len(rows)]["prompt"] for k in range(n_prompts)]
        sync(); t = time.perf_counter()
        if cb:
            with torch.no_grad():
                for ps, pm in zip(sampler.parameters(), model.parameters()):
                    ps.copy_(pm)
                prompt_ids = [tok(p)["input_ids"] for p in prompts for _ in range(n)]
                toks = generate_batch(prompt_ids, new, sorted(eos) or None, sampler)
            # Prompts left-padded, completions right-padded, as GRPOTrainer lays them out.
            plen, clen = max(map(len, prompt_ids)), max(1, max(map(len, toks)))
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            out = torch.full((len(toks), plen + clen), pad_id, dtype=torch.long)
            prompt_mask = torch.zeros((len(toks), plen), dtype=torch.long)
            cmask = torch.zeros((len(toks), clen))
            for r, (pi, ci) in enumerate(zip(prompt_ids, toks)):
                out[r, plen - len(pi):plen] = torch.tensor(pi)
                prompt_mask[r, plen - len(pi):] = 1
                out[r, plen:plen + len(ci)] = torch.tensor(ci, dtype=torch.long)
                cmask[r, :len(ci)] = 1
            out, prompt_mask, cmask = out.to(dev), prompt_mask.to(dev), cmask.to(dev)
            comp = out[:, plen:]
            texts = [tok.decode(ci, skip_special_tokens=True) for ci in toks]
        else:
            enc = tok([p for p in prompts for _ in range(n)], return_tensors="pt", padding=True).to(dev)
            model.eval()
            with torch.no_grad(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                out = model.generate(**enc, **kw)
            plen, prompt_mask = enc["input_ids"].shape[1], enc["attention_mask"]
            comp = out[:, plen:]
            cmask = torch.ones_like(comp, dtype=torch.float)
            for r, row in enumerate(comp.tolist()):  # up to and including the first EOS, as TRL masks
                hit = next((i for i, x in enumerate(row) if x in eos), None)
                if hit is not None:
                    cmask[r, hit + 1:] = 0
            texts = tok.batch_decode(comp, skip_special_tokens=True)
        rewards = torch.tensor([float(sum(ch.isdigit() for ch in x)) for x in texts], device=dev).view(n_prompts, n)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
        model.train()
        att = torch.cat([prompt_mask, cmask.long()], 1)
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=out, attention_mask=att).logits[:, plen - 1:-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, comp[..., None]).squeeze(-1)
        ratio = torch.exp(lp - lp.detach())
        loss = -(ratio * adv[:, None] * cmask).sum() / cmask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        sync()
        if step >= 1:
            times.append(time.perf_counter() - t); tokens.append(int(cmask.sum()))
    s = statistics.median(times)
    impl = "generate_batch" if cb else "generate"
    print(json.dumps({"impl": f"pytorch + transformers {impl} (TRL's GRPO step, no vLLM)", "workload": "grpo",
                      "bf16": bf16, "prompts": n_prompts, "num_generations": n, "max_completion_length": new,
                      "steps": len(times), "median_step_s": s, "completion_tokens": tokens,
                      "torch": torch.__version__, "peak_allocated_mib": peak_mib()}))
    sys.exit(0)

batch, maxlen, steps = map(int, sys.argv[4:7])
if gc:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.config.use_cache = False
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def encode(prompt, completion):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + c)[:maxlen]
    mask = ([0] * len(p) + [1] * len(c))[:maxlen]
    return ids, mask


def collate(pairs):
    n = max(len(i) for i, _ in pairs)
    ids = torch.full((len(pairs), n), tok.pad_token_id)
    att = torch.zeros((len(pairs), n), dtype=torch.long)
    lm = torch.zeros((len(pairs), n))
    for r, (i, m) in enumerate(pairs):
        ids[r, :len(i)] = torch.tensor(i); att[r, :len(i)] = 1; lm[r, :len(m)] = torch.tensor(m, dtype=torch.float)
    return ids.to(dev), att.to(dev), lm.to(dev)


def logps(ids, att, lm):
    with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=att).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (lp * lm[:, 1:]).sum(-1), lm[:, 1:].sum()


times, tokens = [], 0
ref = {}
for step in range(steps + 2):
    chunk = [rows[(step * batch + k) % len(rows)] for k in range(batch)]
    sync(); t = time.perf_counter()
    if work == "sft":
        ids, att, lm = collate([encode(r["prompt"], r["completion"]) for r in chunk])
        s, n = logps(ids, att, lm)
        loss = -s.sum() / n
        ntok = int(att.sum())
    else:
        ids, att, lm = collate([encode(r["prompt"], r["chosen"]) for r in chunk] +
                               [encode(r["prompt"], r["rejected"]) for r in chunk])
        if step not in ref:  # precomputed reference: outside the timed region in TRL too
            sync(); t0 = time.perf_counter()
            with torch.no_grad():
                ref[step] = logps(ids, att, lm)[0].detach()
            sync(); t += time.perf_counter() - t0
        s, _ = logps(ids, att, lm)
        d = (s[:batch] - s[batch:]) - (ref[step][:batch] - ref[step][batch:])
        loss = -F.logsigmoid(0.1 * d).mean()
        ntok = int(att.sum())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    sync()
    if step >= 2:
        times.append(time.perf_counter() - t); tokens = ntok
s = statistics.median(times)
print(json.dumps({"impl": "pytorch (TRL's step maths, eager)", "workload": work, "bf16": bf16, "gradient_checkpointing": gc,
                  "batch": batch, "max_length": maxlen, "steps": len(times), "median_step_s": s,
                  "tokens_per_s": tokens / s, "torch": torch.__version__,
                  "peak_allocated_mib": peak_mib()}))
