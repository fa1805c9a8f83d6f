"""The transformers side of `preftune bench`: the same workloads on the same prompts, for ratios
measured in one run. Workloads:
  fwd-bwd  MODEL_DIR PROMPTS BATCH SEQ_LEN STEPS   forward+backward of mean token NLL (no optimizer)
  generate MODEL_DIR PROMPTS BATCH NEW_TOKENS      sampling at T=1, fixed length (as shared/bench/trl_gen_bench.py)
  rollout  MODEL_DIR PROMPTS PROMPTS N NEW_TOKENS  GRPO's sampling without vLLM: chat prompts, each N times,
                                                   T=1 until EOS, one generate call (as GRPOTrainer)
  matmul   N                                       PyTorch's own f32 N x N x N matmul rate (the MFU yardstick)
With DTYPE=bf16 in the environment the model runs in bfloat16 (transformers' own bf16: weights and
activations), the counterpart of `preftune bench --bf16`. ATTN picks the attention (default sdpa,
transformers' default and its faster option on CPU; ATTN=eager only to compare the two).
Prints one JSON line. Needs scripts/requirements-reference.txt."""
import json, os, resource, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(workload, *args):
    if workload == "matmul":
        n = int(args[0])
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        print(json.dumps({"workload": "matmul", "impl": "torch", "n": n, "threads": torch.get_num_threads(),
                          "gflops": 2 * n**3 / s / 1e9}))
        return
    model_dir, prompts_file, *rest = args
    torch.manual_seed(0)
    prompts = [json.loads(l)["prompt"] for l in open(prompts_file) if l.strip()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    dtype_name = os.environ.get("DTYPE", "f32")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    attn = os.environ.get("ATTN", "sdpa")  # transformers' default, its faster option here; ATTN=eager
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    threads = torch.get_num_threads()
    if workload == "fwd-bwd":
        batch, seq_len, steps = map(int, rest)
        text = ". ".join(prompts) * (1 + seq_len // 60)
        ids = tok(text, add_special_tokens=False)["input_ids"][:seq_len]
        x = torch.tensor([ids] * batch)
        m.train()
        times = []
        for step in range(steps + 1):
            t = time.perf_counter()
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            m.zero_grad(set_to_none=True)
            if step > 0:
                times.append(time.perf_counter() - t)
        s = statistics.median(times)
        print(json.dumps({"workload": "fwd-bwd", "impl": "transformers", "attn": attn, "dtype": dtype_name, "batch": batch, "seq_len": seq_len, "threads": threads,
                          "seconds_per_step": s, "tokens_per_s": batch * seq_len / s, "peak_rss_mib": rss_mib()}))
    elif workload == "generate":
        batch, new = map(int, rest)
        m.eval()
        chosen = [prompts[i % len(prompts)] for i in range(batch)]
        enc = tok(chosen, return_tensors="pt", padding=True)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            m.generate(**enc, **dict(kw, max_new_tokens=4, min_new_tokens=4))
            t = time.perf_counter()
            out = m.generate(**enc, **kw)
            s = time.perf_counter() - t
        n = (out.shape[1] - enc["input_ids"].shape[1]) * batch
        print(json.dumps({"workload": "generate", "impl": "transformers", "attn": attn, "dtype": dtype_name, "batch": batch, "new_tokens": new, "threads": threads,
                          "seconds": s, "tokens_per_s": n / s, "peak_rss_mib": rss_mib()}))
    elif workload == "rollout":
        n_prompts, n, new = map(int, rest)
        m.eval()
        chats = [tok.apply_chat_template([{"role": "user", "content": prompts[i % len(prompts)]}],
                                         tokenize=False, add_generation_prompt=True) for i in range(n_prompts)]
        batch = [c for c in chats for _ in range(n)]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  pad_token_id=tok.pad_token_id, eos_token_id=m.generation_config.eos_token_id)
        with torch.no_grad():
            m.generate(**enc, **dict(kw, max_new_tokens=4))
            t = time.perf_counter()
            out = m.generate(**enc, **kw)
            s = time.perf_counter() - t
        new_ids = out[:, enc["input_ids"].shape[1]:]
        eos = kw["eos_token_id"]
        eos = set(eos if isinstance(eos, list) else [eos])
        lens, finished = [], 0
        for row in new_ids.tolist():
            hit = next((i for i, x in enumerate(row) if x in eos), None)
            lens.append(len(row) if hit is None else hit + 1)
            finished += hit is not None
        print(json.dumps({"workload": "rollout", "impl": "transformers", "attn": attn, "dtype": dtype_name, "prompts": n_prompts,
                          "num_generations": n, "max_new_tokens": new, "threads": threads, "seconds": s,
                          "tokens": sum(lens), "tokens_per_s": sum(lens) / s, "finished": finished,
                          "steps": new_ids.shape[1], "peak_rss_mib": rss_mib()}))
    else:
        sys.exit(f"unknown workload {workload}")


if __name__ == "__main__":
    main(*sys.argv[1:])
