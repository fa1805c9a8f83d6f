"""Extra goldens beyond shared/parity: tiny-llama with Llama 3 RoPE scaling, and as Mistral with a
sliding window, computed by transformers (float32, eager). Writes fixtures/golden/logits-tiny-variants.json.
Usage: python scripts/golden_extra.py   (needs scripts/requirements-reference.txt)"""
import copy, json, os, shutil, tempfile
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
SRC = os.path.join(ROOT, "fixtures/models/tiny-llama")
TEXT = ("Last night we watched an old science fiction film at the cinema downtown. The special effects looked cheap, "
        "but the story was honest and the music was great.")
VARIANTS = {
    # original_max_position_embeddings 16 makes the scaling matter at short lengths.
    "llama3_rope": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}},
    "mistral_window": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 5},
}

def f9(x):
    return [float("%.9g" % v) for v in x]

out = {"torch": torch.__version__, "transformers": transformers.__version__, "text": TEXT, "variants": {}}
tok = AutoTokenizer.from_pretrained(SRC)
ids = tok(TEXT, add_special_tokens=False)["input_ids"]
out["input_ids"] = ids
for name, edit in VARIANTS.items():
    d = tempfile.mkdtemp()
    for f in os.listdir(SRC):
        shutil.copy(os.path.join(SRC, f), d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(copy.deepcopy(edit))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0]
    out["variants"][name] = {"config_edit": edit, "class": type(m).__name__, "logits": [f9(r.tolist()) for r in logits]}
    print(name, type(m).__name__, logits.shape)
path = os.path.join(ROOT, "fixtures/golden/logits-tiny-variants.json")
json.dump(out, open(path, "w"), separators=(",", ":"))
print("wrote", path, os.path.getsize(path))
