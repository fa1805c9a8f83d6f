#!/usr/bin/env python3
"""Tiny Gemma 2 and Gemma 3 GGUF files as llama.cpp's converter writes them, and what transformers
makes of them: the golden for preftune's Gemma GGUF loading (crates/model/tests/gguf_gemma.rs).
Also tokenizer-only files of the Llama and Phi-3 architectures with a sentencepiece vocabulary
and scores (Llama 2, Mistral v0.1 and Phi-3 GGUFs look like this), with transformers' token ids.

Each file has random f16 matrices and f32 norms, norms stored as 1 + w (llama.cpp's convention), and a
sentencepiece vocabulary (`tokenizer.ggml.model = "llama"`, no merges: llama.cpp's Gemma layout)
made up here: Gemma's special tokens, the 256 byte tokens, a token of two real spaces (which
transformers respells with U+2581) and a few hundred word pieces. transformers 5.23 loads each
file (`from_pretrained(..., gguf_file=...)`); the golden holds its token ids for a set of texts
and its logits for one of them.

transformers reads neither the soft-caps nor the local RoPE base nor a layer pattern from a GGUF
file: it takes its config class's defaults (query_pre_attn_scalar 256, soft-caps 50 / 30 for
Gemma 2, every 6th layer global for Gemma 3). The files are made so that llama.cpp's reading and
transformers' agree: head_dim 256, Gemma 2's default soft-caps written out, Gemma 3 with 6
layers and no stored local base or scaling.

Run from the repository root with the reference venv:
    .venv/bin/python scripts/parity/make_sentencepiece_gguf.py
"""
import json
import os
import tempfile

import numpy as np
import torch
from gguf import GGUFWriter, TokenType
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT_MODELS = "fixtures/models"
OUT_GOLDEN = "fixtures/golden/gguf-gemma.json"
TEXTS = [
    "the cat sat on the mat",
    "The Cat  sat,  on the hat!",
    "  leading spaces and trailing  ",
    "caf\u00e9 na\u00efve \u2603 <think>x</think>",
    "<start_of_turn>user\nhello there<end_of_turn>\n",
]
WORDS = (
    "the cat sat on mat hat hello there user model leading spaces and trailing a an in is it "
    "of to be as at by he she we they this that with from for not or but all can had her was "
    "one our out day get has him his how man new now old see two way who boy did its let put "
    "say too use"
).split()


def vocabulary():
    """Gemma-like sentencepiece pieces in file order (the merge order transformers recovers)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    types = [TokenType.CONTROL] * len(tokens)
    types[3] = TokenType.UNKNOWN
    tokens.append("<think>")
    types.append(TokenType.USER_DEFINED)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    pieces = ["\u2581", "  "]
    chars = sorted({c for w in WORDS for c in w} | set("TC,!\n"))
    pieces += chars
    # Pairs, then words with and without the leading U+2581, shortest first.
    grams = []
    for w in WORDS:
        for n in range(2, len(w) + 1):
            grams.append(w[:n])
        grams.append("\u2581" + w)
        grams.append("\u2581" + w[:2])
    seen = set(tokens) | set(pieces)
    for g in sorted(grams, key=lambda g: (len(g), g)):
        if g not in seen:
            seen.add(g)
            pieces.append(g)
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    return tokens, types


def write(path, arch, layers, tokens, types, rng):
    hidden, heads, kv, head_dim, inter = 64, 2, 1, 256, 64
    vocab = len(tokens)
    w = GGUFWriter(path, arch)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", 50.0)
        w.add_float32(f"{arch}.final_logit_softcapping", 30.0)
        w.add_uint32(f"{arch}.attention.sliding_window", 4096)
    else:
        w.add_rope_freq_base(1_000_000.0)
        w.add_uint32(f"{arch}.attention.sliding_window", 4)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    def t(*shape, scale=0.2):  # matrices in f16, as llama.cpp's converter writes them
        return (rng.standard_normal(shape) * scale).astype(np.float16)

    def norm(n):  # f32, stored as 1 + w
        return (1.0 + rng.standard_normal(n) * 0.3).astype(np.float32)

    w.add_tensor("token_embd.weight", t(vocab, hidden, scale=0.5))
    for i in range(layers):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", norm(hidden))
        w.add_tensor(f"{b}.attn_q.weight", t(heads * head_dim, hidden))
        w.add_tensor(f"{b}.attn_k.weight", t(kv * head_dim, hidden))
        w.add_tensor(f"{b}.attn_v.weight", t(kv * head_dim, hidden))
        w.add_tensor(f"{b}.attn_output.weight", t(hidden, heads * head_dim, scale=0.05))
        if arch == "gemma3":
            w.add_tensor(f"{b}.attn_q_norm.weight", norm(head_dim))
            w.add_tensor(f"{b}.attn_k_norm.weight", norm(head_dim))
        w.add_tensor(f"{b}.post_attention_norm.weight", norm(hidden))
        w.add_tensor(f"{b}.ffn_norm.weight", norm(hidden))
        w.add_tensor(f"{b}.ffn_gate.weight", t(inter, hidden))
        w.add_tensor(f"{b}.ffn_up.weight", t(inter, hidden))
        w.add_tensor(f"{b}.ffn_down.weight", t(hidden, inter))
        w.add_tensor(f"{b}.post_ffw_norm.weight", norm(hidden))
    w.add_tensor("output_norm.weight", norm(hidden))
    finish(w)


def finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tokenizer_only(path, arch, tokens, types, scores):
    """Sentencepiece with scores (merges ranked by them), BOS "<s>", no tensors."""
    w = GGUFWriter(path, arch)
    w.add_context_length(512)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    finish(w)


def llama_vocabulary(rng):
    """Llama-2-like: <unk> <s> </s>, byte tokens, pieces with scores that are not in file order."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    g, gt = vocabulary()
    pieces = [p for p in g[264:] if p != "  "]
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    # Scores: longer pieces merge later (lower score), with noise so ties are rare.
    scores = [0.0] * 259 + [float(-len(p) - rng.random()) for p in pieces]
    return tokens, types, scores


def main():
    tokens, types = vocabulary()
    rng = np.random.default_rng(0)
    golden = {"texts": TEXTS, "models": {}}
    for arch, layers in [("gemma2", 2), ("gemma3", 6)]:
        name = f"tiny-{arch}.gguf"
        path = os.path.join(OUT_MODELS, name)
        write(path, arch, layers, tokens, types, rng)
        tok = AutoTokenizer.from_pretrained(OUT_MODELS, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(OUT_MODELS, gguf_file=name, dtype=torch.float32)
        model.eval()
        ids = [tok(t)["input_ids"] for t in TEXTS]
        decoded = [tok.decode(i, skip_special_tokens=True) for i in ids]
        with torch.no_grad():
            x = torch.tensor([ids[0]])
            logits = model(x).logits[0]
        golden["models"][arch] = {
            "file": name,
            "input_ids": ids,
            "decoded": decoded,
            "logits_input": ids[0],
            "logits": logits.tolist(),
            "config": {k: getattr(model.config, k, None) for k in
                       ["query_pre_attn_scalar", "sliding_window", "final_logit_softcapping",
                        "attn_logit_softcapping", "head_dim"]},
        }
        print(arch, os.path.getsize(path), "bytes;", ids[1])
    lt, ltypes, lscores = llama_vocabulary(rng)
    golden["tokenizers"] = {}
    for arch in ["llama", "phi3"]:
        name = f"spm-{arch}.gguf"
        write_tokenizer_only(os.path.join(OUT_MODELS, name), arch, lt, ltypes, lscores)
        tok = AutoTokenizer.from_pretrained(OUT_MODELS, gguf_file=name)
        ids = [tok(t)["input_ids"] for t in TEXTS]
        golden["tokenizers"][arch] = {
            "file": name,
            "input_ids": ids,
            "decoded": [tok.decode(i, skip_special_tokens=True) for i in ids],
        }
        print(arch, ids[1])
    with open(OUT_GOLDEN, "w") as f:
        json.dump(golden, f)


if __name__ == "__main__":
    main()
