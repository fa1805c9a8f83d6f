"""Logits of the tiny fixture models from `preftune --device cuda inspect` against transformers on the
same GPU, f32, on the token ids preftune used. Prints one JSON line per model and prompt; exits 1
if any differs by more than 1e-4. Usage: parity.py BIN"""
import json, subprocess, sys
import torch
from transformers import AutoModelForCausalLM

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
bin_ = sys.argv[1]
ok = True
for name in ("tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-qwen3", "tiny-phi3", "tiny-olmo2", "tiny-gemma2",
             "tiny-gemma3", "tiny-mixtral", "tiny-qwen3moe", "tiny-qwen2moe"):
    path = f"fixtures/models/{name}"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except (ValueError, KeyError) as e:
        # An architecture this machine's transformers does not know yet: reported, not failed.
        print(json.dumps({"check": "logits-vs-transformers", "model": name, "skipped": str(e)[:200]}), flush=True)
        continue
    model = model.cuda().eval()
    for prompt in ("The movie was good and the actors", "Hello"):
        out = json.loads(subprocess.run([bin_, "--device", "cuda", "inspect", "--model", path, "--prompt", prompt,
                                         "--top-k", "5"], check=True, capture_output=True, text=True).stdout)
        ids = torch.tensor([out["ids"]], device="cuda")
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0].double().cpu()
        diff = (torch.tensor(out["last_logits"], dtype=torch.float64) - ref[-1]).abs().max().item()
        for pos, row in enumerate(out["top_k"]):
            for tok, val in row:
                diff = max(diff, abs(val - ref[pos, tok].item()))
        good = diff <= 1e-4
        ok &= good
        print(json.dumps({"check": "logits-vs-transformers", "model": name, "tokens": len(out["ids"]),
                          "max_abs_diff": diff, "ok": good}), flush=True)
sys.exit(0 if ok else 1)
