"""Read a GGUF file written by `preftune export-gguf` with PyPI's `gguf` (llama.cpp's own reader):
every tensor dequantises, and each one matches the Hugging Face weight it came from (Llama's Q/K
permutation undone) within its type's rounding; the tokenizer metadata is complete.
Usage: python scripts/check_gguf_export.py HF_DIR FILE.gguf
Needs gguf, numpy, safetensors (pip install gguf safetensors). Prints one JSON object; exits 1 on
a mismatch."""
import json, sys
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file

HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
      "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
      "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
      # Phi-3's fused projections; OLMo 2: norms after the attention and the MLP
      "attn_qkv": "self_attn.qkv_proj",
      "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# Worst |difference| relative to the tensor's largest |value| that each type may give.
TOL = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q6_K": 3e-2, "Q5_0": 6e-2, "Q4_K": 0.15}

def hf_name(n, arch=None):
    if n == "token_embd.weight": return "model.embed_tokens.weight"
    if n == "output_norm.weight": return "model.norm.weight"
    if n == "output.weight": return "lm_head.weight"
    _, layer, g, kind = n.split(".")
    if g == "ffn_up" and arch == "phi3":
        return f"model.layers.{layer}.mlp.gate_up_proj.{kind}"
    return f"model.layers.{layer}.{HF[g]}.{kind}"

def unpermute(w, n_head):
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)

hf_dir, path = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{hf_dir}/config.json"))
weights = load_file(f"{hf_dir}/model.safetensors")
r = GGUFReader(path)
arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
rows, worst_ok = [], True
for t in r.tensors:
    w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)] if len(t.shape) > 1 else -1)
    if arch == "llama" and t.name.endswith("attn_q.weight"):
        w = unpermute(w, cfg["num_attention_heads"])
    elif arch == "llama" and t.name.endswith("attn_k.weight"):
        w = unpermute(w, cfg["num_key_value_heads"])
    ref = weights[hf_name(t.name, arch)].astype(np.float32)
    rel = float(np.abs(w - ref).max() / max(np.abs(ref).max(), 1e-12))
    ok = w.shape == ref.shape and rel <= TOL[t.tensor_type.name]
    worst_ok &= ok
    rows.append((t.name, t.tensor_type.name, rel, ok))
n_tokens = len(r.fields["tokenizer.ggml.tokens"].data)
by_type = {}
for _, ty, rel, _ in rows:
    by_type[ty] = max(by_type.get(ty, 0.0), rel)
ok = worst_ok and len(rows) == len(weights) - ("lm_head.weight" in weights and cfg.get("tie_word_embeddings", False)) \
    and n_tokens == cfg["vocab_size"]
print(json.dumps({"architecture": arch, "tensors": len(rows), "hf_tensors": len(weights), "tokens": n_tokens,
                  "worst_relative_error_by_type": by_type, "bad": [x[0] for x in rows if not x[3]], "ok": ok}))
sys.exit(0 if ok else 1)
