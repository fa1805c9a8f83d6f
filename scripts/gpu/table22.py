"""Issue 22's table from the lines scripts/gpu/table22.sh writes (one JSON object per row, preftune's
and the reference's): throughput and peak-memory ratios against the targets, model FLOPs
utilisation, and sampling's share of the memory-bandwidth roofline.

Usage: table22.py LINES MODEL_DIR [--markdown OUT.md] [--gpu NAME]

- Training rows pair on (workload, max_length). Tokens/s is rows x max_length / median step on both
  sides (every timing row is truncated to max_length; DPO runs chosen and rejected, 2 x batch rows).
- MFU counts model FLOPs, PaLM's way: 6 N + 12 L (heads x head_dim) T per token, N the matmul
  weights (the LM head included, embeddings not), recomputation under checkpointing not counted;
  against PEAK_TFLOPS (default 989, dense bf16 on an H100/H200 SXM, as issue 22 states).
- Sampling and GRPO are compared with the faster of the reference's rows (transformers' `generate`
  on a padded batch, or its continuous batching, `generate_batch`).
- Sampling's roofline: a decoding step reads every matmul weight once in bf16 and the KV cache of
  its rows (mean context: prompt + new / 2), at the GPU's datasheet bandwidth (HBM_TBS overrides).
- Peak memory is nvidia-smi's used memory over the idle reading, sampled every 50 ms, on both sides.

Prints the Markdown table, then one JSON line {"check": "table-issue22", ...}; exits 1 when no pair
of rows could be formed (the targets themselves are reported, not enforced)."""
import argparse, json, os, subprocess, sys

TARGETS = {"train_speed": 1.5, "train_memory": 0.7, "grpo_speed": 2.0, "sampling_speed": 3.0, "mfu_2048": 0.45}


def model_shape(model_dir):
    c = json.load(open(os.path.join(model_dir, "config.json")))
    d, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or d // heads
    v = c["vocab_size"]
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f
    return {"matmul_params": layers * per_layer + v * d, "layers": layers, "attn_width": heads * hd,
            "kv_width": kv * hd}


def bandwidth(gpu):
    if os.environ.get("HBM_TBS"):
        return float(os.environ["HBM_TBS"]) * 1e12
    g = gpu.upper()
    for key, tbs in (("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIE", 2.0), ("H100", 3.35), ("A100-SXM4-80", 2.039),
                     ("A100 80GB PCIE", 1.935), ("A100", 1.555)):
        if key in g:
            return tbs * 1e12
    return None


def gpu_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "none"


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lines")
    ap.add_argument("model_dir")
    ap.add_argument("--markdown")
    ap.add_argument("--gpu")
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.lines) if l.startswith("{")]
    shape = model_shape(a.model_dir)
    peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
    gpu = a.gpu or gpu_name()
    ours = lambda r: r.get("impl") == "preftune"
    out, md, met = [], [], {}

    # Training steps.
    md += ["| workload | length | checkpointing | preftune tokens/s | reference tokens/s | speed ratio "
           "(>= 1.5) | preftune peak MiB | reference peak MiB | memory ratio (<= 0.7) | preftune MFU | "
           "reference MFU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in ("sft", "dpo"):
        lengths = sorted({r["max_length"] for r in rows if r.get("workload") == w and "max_length" in r})
        for t in lengths:
            pair = [r for r in rows if r.get("workload") == w and r.get("max_length") == t]
            us = next((r for r in pair if ours(r)), None)
            ref = next((r for r in pair if not ours(r)), None)
            if not (us and ref):
                continue
            n = (2 if w == "dpo" else 1) * us["batch"]
            flops = n * t * (6 * shape["matmul_params"] + 12 * shape["layers"] * shape["attn_width"] * t)
            tps = lambda r: n * t / r["median_step_s"]
            mfu = lambda r: flops / r["median_step_s"] / peak
            mem = lambda r: r.get("gpu_mem_peak_mib")
            speed = tps(us) / tps(ref)
            memr = mem(us) / mem(ref) if mem(us) and mem(ref) else None
            e = {"workload": w, "max_length": t, "gradient_checkpointing": [us["gradient_checkpointing"],
                 ref.get("gradient_checkpointing")], "tokens_per_s": [tps(us), tps(ref)], "speed_ratio": speed,
                 "gpu_mem_peak_mib": [mem(us), mem(ref)], "memory_ratio": memr, "mfu": [mfu(us), mfu(ref)],
                 "speed_met": speed >= TARGETS["train_speed"],
                 "memory_met": None if memr is None else memr <= TARGETS["train_memory"]}
            if t >= 2048:
                e["mfu_met"] = mfu(us) >= TARGETS["mfu_2048"]
            out.append(e)
            md.append(f"| {w} | {t} | {'on' if us['gradient_checkpointing'] else 'off'} / "
                      f"{'on' if ref.get('gradient_checkpointing') else 'off'} | {tps(us):.0f} | {tps(ref):.0f} | "
                      f"{speed:.2f}x | {fmt(mem(us), '.0f')} | {fmt(mem(ref), '.0f')} | {fmt(memr)}x | "
                      f"{100 * mfu(us):.1f}% | {100 * mfu(ref):.1f}% |")

    # Sampling.
    bw = bandwidth(gpu)
    gen = [r for r in rows if r.get("workload") == "generate"]
    # The fastest reference counts (plain generate, or transformers' continuous batching).
    ref = max((r for r in gen if not ours(r)), key=lambda r: r["tokens_per_s"], default=None)
    md += ["", "| sampling (bf16) | batch x new tokens | tokens/s | vs transformers (>= 3) | roofline share |",
           "|---|---|---|---|---|"]
    for r in gen:
        b, new = r["batch"], r["new_tokens"]
        ctx = float(os.environ.get("PROMPT_TOKENS", "10")) + new / 2
        step_bytes = 2 * shape["matmul_params"] + 2 * 2 * shape["layers"] * shape["kv_width"] * ctx * b
        roof = b * bw / step_bytes if bw else None
        share = r["tokens_per_s"] / roof if roof else None
        ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref and ours(r) else None
        name = r["impl"] if not ours(r) else (
            "preftune, fixed-shape steps" + (f" ({r['cuda_graphs']['replays']} graph replays)"
                                             if r.get("cuda_graphs", {}).get("replays") else "")
            if r.get("fixed_steps") else "preftune, eager")
        e = {"workload": "generate", "impl": name, "batch": b, "new_tokens": new, "tokens_per_s": r["tokens_per_s"],
             "vs_reference": ratio, "roofline_tokens_per_s": roof, "roofline_share": share}
        if ratio is not None:
            e["speed_met"] = ratio >= TARGETS["sampling_speed"]
        out.append(e)
        md.append(f"| {name} | {b} x {new} | {r['tokens_per_s']:.0f} | {fmt(ratio)}{'x' if ratio else ''} | "
                  f"{fmt(None if share is None else 100 * share, '.1f')}{'%' if share else ''} |")

    # GRPO iterations.
    grpo = [r for r in rows if r.get("workload") == "grpo"]
    ref = min((r for r in grpo if not ours(r)), key=lambda r: r["median_step_s"], default=None)
    shape_of = lambda r: f"{r['prompts']} x {r['num_generations']} x {r['max_completion_length']}"
    md += ["", f"| GRPO iteration ({shape_of(grpo[0]) if grpo else '-'}, bf16) | median s | vs reference (>= 2) |",
           "|---|---|---|"]
    for r in grpo:
        ratio = ref["median_step_s"] / r["median_step_s"] if ref and ours(r) else None
        name = r.get("impl") + (" " + r["options"] if ours(r) else "")
        e = {"workload": "grpo", "impl": name, "median_step_s": r["median_step_s"], "speedup": ratio}
        if ratio is not None:
            e["speed_met"] = ratio >= TARGETS["grpo_speed"]
        out.append(e)
        md.append(f"| {name} | {r['median_step_s']:.2f} | {fmt(ratio)}{'x' if ratio else ''} |")

    head = (f"Issue 22's table on {gpu} ({os.path.basename(os.path.normpath(a.model_dir))}: "
            f"{shape['matmul_params'] / 1e9:.2f}B matmul weights; MFU against {peak / 1e12:.0f} TFLOP/s; "
            f"bandwidth {fmt(None if bw is None else bw / 1e12)} TB/s)")
    text = "\n".join([head, ""] + md) + "\n"
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    paired = any("speed_ratio" in e or "vs_reference" in e and e["vs_reference"] is not None
                 or e.get("speedup") is not None for e in out)
    print(json.dumps({"check": "table-issue22", "ok": paired, "gpu": gpu, "rows": out}))
    return 0 if paired else 1


if __name__ == "__main__":
    sys.exit(main())
