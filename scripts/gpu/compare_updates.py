"""Compares two first-update dumps (PREFTUNE_DUMP_FIRST_UPDATE) of the same run on two devices.
Prints one JSON line: the loss's relative difference and, over every parameter, the worst
max|g_a - g_b| / max|g_a| (each parameter's gradient against its own scale), with the bars
(loss 1e-4 relative, or absolute below 1e-2; gradients 1e-3). Usage: compare_updates.py A B LABEL"""
import json, sys
import numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open

a_path, b_path, label = sys.argv[1:4]
a, b = load_file(a_path), load_file(b_path)
def loss(p):
    with safe_open(p, "np") as f:
        return float(f.metadata()["loss"])
la, lb = loss(a_path), loss(b_path)
# A loss that is zero in exact arithmetic (RLOO's at the first step) is compared absolutely.
loss_rel = abs(la - lb) / max(abs(la), 1e-2)
assert set(a) == set(b), f"parameters differ: {sorted(set(a) ^ set(b))[:5]}"
worst, worst_name, zero = 0.0, "", 0
for k in a:
    if k == "loss":
        continue
    scale = float(np.abs(a[k]).max())
    d = float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max())
    if scale == 0.0:
        zero += 1
        r = 0.0 if d == 0.0 else float("inf")
    else:
        r = d / scale
    if r > worst:
        worst, worst_name = r, k
# A step whose gradients are all zero (every advantage zero, say) proves nothing.
ok = loss_rel <= 1e-4 and worst <= 1e-3 and zero < len(a) - 1
print(json.dumps({"check": label, "ok": ok, "loss_a": la, "loss_b": lb, "loss_rel_diff": loss_rel,
                  "params": len(a) - 1, "zero_grad_params": zero, "worst_grad_rel_diff": worst,
                  "worst_param": worst_name}))
sys.exit(0 if ok else 1)
