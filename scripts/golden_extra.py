"""Extra goldens beyond shared/parity, computed by transformers (float32, eager): tiny-llama with
Llama 3 RoPE scaling, as Mistral with a sliding window, and shaped as Llama 3.2 (tied embeddings
plus Llama 3 RoPE); tiny-qwen2 with Qwen2.5's config keys. Writes
fixtures/golden/logits-tiny-variants.json.
Usage: python scripts/golden_extra.py   (needs scripts/requirements-reference.txt)"""
import copy, json, os, shutil, tempfile
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODELS = os.path.join(ROOT, "fixtures/models")
TEXT = ("Last night we watched an old science fiction film at the cinema downtown. The special effects looked cheap, "
        "but the story was honest and the music was great.")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name: (the tiny model edited, the config keys set)
VARIANTS = {
    # original_max_position_embeddings 16 makes the scaling matter at short lengths.
    "llama3_rope": ("tiny-llama", {"rope_parameters": LLAMA3_ROPE, "rope_scaling": LLAMA3_ROPE}),
    "mistral_window": ("tiny-llama", {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 5}),
    # Llama 3.2 1B/3B: the LM head tied to the embeddings (no lm_head.weight in the file), and
    # Llama 3 RoPE.
    "llama32_tied": ("tiny-llama", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE,
                                    "rope_scaling": LLAMA3_ROPE}),
    # Qwen2.5: a qwen2 config with rope_theta 1e6 and the sliding-window keys it ships (unused).
    "qwen25": ("tiny-qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                              "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
                              "max_window_layers": 21}),
}

def f9(x):
    return [float("%.9g" % v) for v in x]

out = {"torch": torch.__version__, "transformers": transformers.__version__, "text": TEXT, "variants": {}}
tok = AutoTokenizer.from_pretrained(os.path.join(MODELS, "tiny-llama"))
ids = tok(TEXT, add_special_tokens=False)["input_ids"]
out["input_ids"] = ids
for name, (base, edit) in VARIANTS.items():
    src = os.path.join(MODELS, base)
    d = tempfile.mkdtemp()
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(copy.deepcopy(edit))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    if edit.get("tie_word_embeddings"):
        # A tied checkpoint has no head of its own (with one, transformers 5 keeps it untied).
        w = load_file(os.path.join(d, "model.safetensors"))
        w.pop("lm_head.weight", None)
        save_file(w, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0]
    out["variants"][name] = {"base": base, "config_edit": edit, "class": type(m).__name__, "logits": [f9(r.tolist()) for r in logits]}
    print(name, type(m).__name__, logits.shape)
path = os.path.join(ROOT, "fixtures/golden/logits-tiny-variants.json")
json.dump(out, open(path, "w"), separators=(",", ":"))
print("wrote", path, os.path.getsize(path))
