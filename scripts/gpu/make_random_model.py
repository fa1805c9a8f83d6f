"""Writes a Llama-family HF model folder with seeded random weights of a named real shape, with the
tiny fixture tokenizer (ids it encodes are valid in any of these vocabularies). For the GPU check,
whose machine has no real weights. Usage: make_random_model.py OUT {smollm2-135m,llama-3.2-1b} SEED"""
import os, shutil, sys
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # SmolLM2-135M(-Instruct)'s config.json, less the tokenizer ids.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope=dict(rope_type="default", rope_theta=100000.0)),
    # Llama-3.2-1B's, with its llama3 RoPE scaling.
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192)),
}

out, shape, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
tiny = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "models", "tiny-llama")
kw = dict(SHAPES[shape])
rope = kw.pop("rope")
if int(transformers.__version__.split(".")[0]) >= 5:
    kw["rope_parameters"] = rope
else:
    kw["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        kw["rope_scaling"] = rope
cfg = LlamaConfig(bos_token_id=0, eos_token_id=2, pad_token_id=3, initializer_range=0.02, **kw)
torch.manual_seed(seed)
model = LlamaForCausalLM(cfg).to(torch.float32)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copy(os.path.join(tiny, f), out)
print(f"{out}: {shape}, seed {seed}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
