"""Build tiny, randomly initialised Hugging Face causal LMs for parity tests (the team's
shared/parity/make_tiny_models.py, in the repo, with the architectures added since).

Usage:  python scripts/parity/make_tiny_models.py OUT_DIR [NAME...]
Writes OUT_DIR/NAME for each model named (default: all): tiny-llama, tiny-qwen2, tiny-gpt2 (the
originals, bit for bit), tiny-qwen3 (q/k RMSNorm, head_dim 32 != hidden / heads), tiny-phi3 (fused qkv and gate_up),
tiny-olmo2 (norms after each sublayer, q/k RMSNorm over all heads), tiny-gemma2 (1 + w norms on both sides of each
sublayer, GeGLU, scaled embeddings, attention and logit soft-capping, alternating sliding-window layers),
tiny-gemma3 (as Gemma 2 without soft-capping, with per-head q/k norms and local layers on their own RoPE base),
tiny-mixtral (mixture of experts: 4 experts, 2 a token, renormalised), tiny-qwen3moe (Qwen3's attention, 4 experts of
width 48, 2 a token, renormalised, as the released Qwen3-MoE models are, so that llama.cpp runs it too),
tiny-qwen2moe (Qwen2's biases, 4 experts of width 48, 2 a token, not renormalised, a gated shared expert),
each with config.json,
model.safetensors (float32), tokenizer.json, tokenizer_config.json (ChatML chat_template),
generation_config.json.  Deterministic: torch.manual_seed(0) before each model is built.

Weights: the standard HF init with initializer_range=0.2, then norm weights are set to
1 + 0.1*N(0,1) and every bias (norm biases, attention/MLP biases) to 0.1*N(0,1), so that a
re-implementation that forgets a norm weight or a bias fails the golden tests.
"""
import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Olmo2Config,
                          MixtralConfig, MixtralForCausalLM, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

CORPUS = """
The movie opens with a long shot of a quiet city at night. A young director wanted to make a film about memory,
and she spent three years writing the script. The actors were mostly unknown, but the cast worked well together.
Critics praised the music, the camera work, and the careful editing. Some viewers found the story slow, while others
said it was the best film of the year.

Going to the cinema is still a popular way to spend a Friday evening. People buy tickets, popcorn, and cold drinks,
then sit in the dark and watch the trailers. A good comedy makes the whole room laugh at the same time. A good horror
movie makes everyone jump. Many families prefer animated films, because children and parents can enjoy them together.

The old western was filmed in the desert over a hot summer. The hero rides into town, meets the sheriff, and finds out
that the bank was robbed. The ending is simple but strong. The film did not earn much money when it came out, but
today it is called a classic, and students study its scenes in film school.

A science fiction movie needs a believable world. The best ones use special effects to serve the story, not to replace
it. In this film the spaceship feels real, the crew talks like real people, and the danger grows slowly. When the
lights go out in the final act, the audience holds its breath.

I liked the movie because the characters were honest and the dialogue was sharp. I did not like the second half,
because it was too long and the plot became confusing. Overall I would give it three stars out of five. My friend
loved it and wants to watch it again next week.
"""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BOS, EOS, PAD = 0, 2, 3


def build_tokenizer():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([p.strip() for p in CORPUS.strip().split("\n\n")] * 4, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tk.token_to_id(s) == i, (s, tk.token_to_id(s))
    return tk


def perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif ("norm" in name or ".ln_" in name) and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def write_folder(out, model, tk, vocab):
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # keep rope_theta at top level as well (older readers, e.g. candle, look for it there)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    rp = cfg.get("rope_parameters") or {}
    if "rope_theta" in rp and "rope_theta" not in cfg:
        cfg["rope_theta"] = rp["rope_theta"]
    cfg["torch_dtype"] = "float32"
    json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    tk.save(os.path.join(out, "tokenizer.json"))
    json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE,
                   bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None,
                   add_bos_token=False, add_eos_token=False, padding_side="left", model_max_length=256,
                   clean_up_tokenization_spaces=False),
              open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
    json.dump(dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False),
              open(os.path.join(out, "generation_config.json"), "w"), indent=2)
    for f in os.listdir(out):  # only the five files asked for
        if f not in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            os.remove(os.path.join(out, f))


def main(root, names=()):
    tk = build_tokenizer()
    vocab = tk.get_vocab_size()
    common = dict(vocab_size=vocab, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)
    specs = {
        "tiny-llama": (LlamaForCausalLM, LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256,
            hidden_act="silu", attention_bias=False, mlp_bias=False, **common)),
        "tiny-qwen2": (Qwen2ForCausalLM, Qwen2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=256,
            hidden_act="silu", use_sliding_window=False, **common)),
        "tiny-gpt2": (GPT2LMHeadModel, GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=None, activation_function="gelu_new",
            layer_norm_epsilon=1e-5, tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **common)),
        # q_norm / k_norm over each head, and a head_dim that is not hidden_size / heads.
        "tiny-qwen3": (Qwen3ForCausalLM, Qwen3Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            max_position_embeddings=256, hidden_act="silu", attention_bias=False, use_sliding_window=False,
            **common)),
        # Phi-3: fused qkv_proj and gate_up_proj.
        "tiny-phi3": (Phi3ForCausalLM, Phi3Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
            max_position_embeddings=256, original_max_position_embeddings=256, hidden_act="silu",
            sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **common)),
        # OLMo 2: post-sublayer norms, q/k RMSNorm over all heads.
        "tiny-olmo2": (Olmo2ForCausalLM, Olmo2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            max_position_embeddings=256, hidden_act="silu", attention_bias=False, **common)),
        # Gemma 2: 4 layers alternating local (window 4, shorter than the golden texts) and global,
        # soft-capping at values the random logits reach, query_pre_attn_scalar != head_dim.
        "tiny-gemma2": (Gemma2ForCausalLM, Gemma2Config(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=256,
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24, sliding_window=4,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, attention_bias=False, **common)),
        # Gemma 3: local layers (window 4, RoPE base 10000) and a global one (base 1e6, linear scaling 2).
        "tiny-gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=128, rms_norm_eps=1e-6, max_position_embeddings=256,
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32, sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}},
            attention_bias=False, **common)),
        # Mixtral: every layer a mixture of 4 SwiGLU experts, the best 2 a token, weights renormalised.
        "tiny-mixtral": (MixtralForCausalLM, MixtralConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            num_local_experts=4, num_experts_per_tok=2, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, max_position_embeddings=256, hidden_act="silu", sliding_window=None,
            router_jitter_noise=0.0, **common)),
        # Qwen3-MoE: experts of their own width (not intermediate_size).
        "tiny-qwen3moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=128, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256, hidden_act="silu",
            attention_bias=False, use_sliding_window=False, **common)),
        # Qwen2-MoE: Qwen2's q/k/v biases, 4 experts of width 48, 2 a token, not renormalised (the
        # released models' setting), a shared expert of width 80 behind a sigmoid gate; experts in
        # every layer, as the released models and llama.cpp's qwen2moe have them.
        "tiny-qwen2moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
            qkv_bias=True, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
            max_position_embeddings=256, hidden_act="silu", use_sliding_window=False, **common)),
    }
    for name, (cls, cfg) in specs.items():
        if names and name not in names:
            continue
        torch.manual_seed(0)
        model = cls(cfg).float().eval()
        perturb(model)
        out = os.path.join(root, name)
        write_folder(out, model, tk, vocab)
        # verify
        m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        t2 = AutoTokenizer.from_pretrained(out)
        sd1, sd2 = model.state_dict(), m2.state_dict()
        assert all(torch.equal(sd1[k], sd2[k]) for k in sd1), name
        chat = t2.apply_chat_template([{"role": "user", "content": "Was the movie good?"}], tokenize=False,
                                      add_generation_prompt=True)
        assert chat == "<|im_start|>user\nWas the movie good?<|im_end|>\n<|im_start|>assistant\n", chat
        ids = t2(chat)["input_ids"]
        assert ids[0] == 1 and t2.decode(ids) == chat, ids
        with torch.no_grad():
            logits = m2(torch.tensor([ids])).logits
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        assert size < 1_000_000, size
        print(f"{name}: vocab {vocab}, params {sum(p.numel() for p in m2.parameters())}, folder {size} bytes, "
              f"logit std {logits.std().item():.3f}, chat ids {ids}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", sys.argv[2:])
