#!/usr/bin/env python3
"""A Llama-architecture GGUF with random weights at a given shape, for memory benchmarks of LoRA on
a quantised base (docs/qlora.md): linears in Q4_0 (random 4-bit values, one f16 scale per block of
32), the embedding in f16, norms at one, and SmolLM2's tokenizer copied from its GGUF.

Default shape: SmolLM2-1.7B's (hidden 2048, 24 layers, 32 heads, MLP 8192, vocab 49152, tied
embeddings), 1.71B parameters.

    .venv/bin/python scripts/make_random_gguf.py --tokenizer-from SmolLM2-135M-Instruct.Q4_1.gguf \
        --out /tmp/random-1.7b-q4_0.gguf

Needs PyPI `gguf` (scripts/requirements-reference.txt).
"""
import argparse

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

TOKENIZER_KEYS = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
]


def q4_0(rng, rows, cols, scale):
    """Random Q4_0 blocks as raw bytes: [rows, cols / 32 * 18]."""
    assert cols % 32 == 0
    blocks = rows * cols // 32
    out = np.empty((blocks, 18), dtype=np.uint8)
    out[:, :2] = np.full(blocks, scale, dtype=np.float16).view(np.uint8).reshape(blocks, 2)
    out[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return out.reshape(rows, cols // 32 * 18)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-from", required=True, help="a GGUF with a gpt2 tokenizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    src = GGUFReader(a.tokenizer_from)
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(a.seed)
    w = GGUFWriter(a.out, "llama")
    w.add_block_count(a.layers)
    w.add_context_length(a.context)
    w.add_embedding_length(a.hidden)
    w.add_feed_forward_length(a.intermediate)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(130000.0)
    w.add_rope_dimension_count(a.hidden // a.heads)
    w.add_vocab_size(vocab)
    for key in TOKENIZER_KEYS:
        f = src.fields.get(key)
        if f is None:
            continue
        t = f.types[0]
        if t == GGUFValueType.ARRAY:
            w.add_array(key, f.contents())
        elif t == GGUFValueType.STRING:
            w.add_string(key, f.contents())
        elif t == GGUFValueType.BOOL:
            w.add_bool(key, bool(f.contents()))
        else:
            w.add_uint32(key, int(f.contents()))

    h, hd, kv = a.hidden, a.hidden // a.heads, a.kv_heads
    # Weights of std ~0.02: Q4_0 values are (q - 8) * d with q uniform in 0..15 (std ~4.6 d).
    d = 0.02 / 4.6
    w.add_tensor(
        "token_embd.weight",
        (rng.standard_normal((vocab, h), dtype=np.float32) * 0.02).astype(np.float16),
    )
    ones = np.ones(h, dtype=np.float32)
    params = vocab * h + (2 * a.layers + 1) * h
    for i in range(a.layers):
        b = f"blk.{i}"
        for name, rows, cols in [
            ("attn_q", h, h),
            ("attn_k", kv * hd, h),
            ("attn_v", kv * hd, h),
            ("attn_output", h, h),
            ("ffn_gate", a.intermediate, h),
            ("ffn_up", a.intermediate, h),
            ("ffn_down", h, a.intermediate),
        ]:
            w.add_tensor(
                f"{b}.{name}.weight",
                q4_0(rng, rows, cols, d),
                raw_dtype=GGMLQuantizationType.Q4_0,
            )
            params += rows * cols
        w.add_tensor(f"{b}.attn_norm.weight", ones)
        w.add_tensor(f"{b}.ffn_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{a.out}: {params / 1e9:.3f}B parameters, vocab {vocab}")


if __name__ == "__main__":
    main()
