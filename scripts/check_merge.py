"""Check `preftune merge` against peft's merge_and_unload: the merged folder loads in transformers
and gives peft's merged model's logits; every merged weight matches peft's.
Usage: python scripts/check_merge.py BASE_DIR ADAPTER_DIR MERGED_DIR
Needs torch, transformers and peft (scripts/requirements-reference.txt). Prints one JSON object;
exits 1 on a mismatch."""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base, adapter, merged = sys.argv[1:4]
text = "The movie was good and the actors worked well together."
tok = AutoTokenizer.from_pretrained(base)
ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
ref = PeftModel.from_pretrained(ref, adapter).merge_and_unload().eval()
ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager").eval()
ids = torch.tensor([tok(text)["input_ids"]])
with torch.no_grad():
    d_logits = (ref(ids).logits - ours(ids).logits).abs().max().item()
sr, so = ref.state_dict(), ours.state_dict()
d_weights = max((sr[k] - so[k]).abs().max().item() for k in sr)
plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
moved = max((sr[k] - plain[k]).abs().max().item() for k in sr)
ok = set(sr) == set(so) and d_logits < 1e-4 and d_weights < 1e-5 and moved > 1e-4
print(json.dumps({"same_keys": set(sr) == set(so), "max_abs_logit_diff": d_logits,
                  "max_abs_weight_diff": d_weights, "merge_moves_weights_by": moved, "ok": ok}))
sys.exit(0 if ok else 1)
