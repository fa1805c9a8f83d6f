"""Check that a LoRA adapter saved by preftune loads in `peft` and gives preftune's logits.
Usage: python scripts/check_peft_adapter.py BASE_MODEL_DIR ADAPTER_DIR [PREFTUNE_BIN]
Needs torch, transformers and peft. Prints one JSON object; exits 1 on a mismatch."""
import json, subprocess, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

def main(base, adapter, binary="target/release/preftune"):
    text = "The movie was good and the actors worked well together."
    ours = json.loads(subprocess.run([binary, "inspect", "--model", base, "--adapter", adapter, "--prompt", text],
                                     check=True, capture_output=True, text=True).stdout)
    tok = AutoTokenizer.from_pretrained(base)
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    m = PeftModel.from_pretrained(m, adapter).eval()
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0]
    d = (logits[-1] - torch.tensor(ours["last_logits"])).abs().max().item()
    with m.disable_adapter(), torch.no_grad():
        plain = m(torch.tensor([ids])).logits[0]
    moved = (logits[-1] - plain[-1]).abs().max().item()
    ok = ids == ours["ids"] and d < 1e-4 and moved > 1e-3
    print(json.dumps({"same_ids": ids == ours["ids"], "max_abs_logit_diff": d, "adapter_moves_logits_by": moved, "ok": ok}))
    sys.exit(0 if ok else 1)

if __name__ == "__main__":
    main(*sys.argv[1:])
