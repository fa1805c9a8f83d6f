"""Check that a folder written by `preftune convert` loads in transformers unchanged and gives the
same tokens and logits as preftune's own load of the source model (a GGUF file or an HF folder).

Usage: python scripts/check_hf_roundtrip.py SOURCE HF_DIR [PREFTUNE_BIN]
Needs the reference stack: pip install -r scripts/requirements-reference.txt
Prints one JSON object and exits 1 on a mismatch.
"""
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The capital of France is", "Gravity is the force by which a planet draws objects toward its center."]
CHAT = "What is the capital of France?"


def preftune(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main(source, hf_dir, binary="target/release/preftune"):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    report, ok = {"source": source, "hf_dir": hf_dir, "cases": []}, True
    cases = [(p, False) for p in PROMPTS] + [(CHAT, True)]
    for text, chat in cases:
        ours = preftune(binary, "inspect", "--model", source, "--prompt", text, *(["--chat"] if chat else []))
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok(text)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum().item()
        dlogit = (logits[-1] - torch.tensor(ours["last_logits"])).abs().max().item()
        dlp = abs(lp - ours["sum_logprob"])
        same_ids = list(ids) == ours["ids"]
        good = same_ids and dlogit < 1e-3 and dlp < 5e-3
        ok &= good
        report["cases"].append(dict(text=text, chat=chat, same_ids=same_ids, max_abs_logit_diff=dlogit,
                                    sum_logprob_diff=dlp, ok=good))
    report["ok"] = ok
    print(json.dumps(report, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
