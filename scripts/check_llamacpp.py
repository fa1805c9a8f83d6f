"""llama.cpp itself runs what `preftune export-gguf` writes: for each type, export the model, then
decode greedily in llama.cpp (through llama-cpp-python, built from its sdist, which vendors
llama.cpp's source) and in preftune from the same GGUF file and from the original folder, on the
same prompt token ids, and compare the tokens.

f32 and f16 must agree token for token. On q8_0, llama.cpp's products quantise the activations to int8
too, and int8 rounding turns ulp-level differences of arithmetic into logit differences of the
size of the quantisation noise: llama.cpp's own logits on the same file move by up to about 2
between its two ways of reading a prompt (all at once, its default, or a token at a time with
n_batch=1), and its greedy tokens then can part. So for quantised types the script measures
llama.cpp against itself, and asks preftune to be about as close to llama.cpp as llama.cpp is to
itself:
- teacher-forced along preftune's greedy path, the largest difference between preftune's and
  llama.cpp's logits (on preftune's top 5 tokens at every position) is within SAME_ORDER times the
  largest difference between llama.cpp's two modes on the same tokens (preftune multiplies f32
  activations by the dequantised weights, so its difference holds all of llama.cpp's activation
  rounding, where llama.cpp's two modes share most of theirs: the same order, not the same value);
- where llama.cpp's greedy tokens part from preftune's, llama.cpp's own logit gap between the two
  tokens there is within llama.cpp's self-difference (a near tie llama.cpp itself could break
  either way).
A wrongly written file (scales, block order, q/k permutation) fails both by a wide margin.

Usage: python scripts/check_llamacpp.py PREFTUNE_BIN HF_DIR OUT_DIR [TYPE...]   (default f16 q8_0)
Needs llama-cpp-python (scripts/check_llamacpp.sh builds it). Prints one JSON object per type and a
summary; exits 1 if a check fails."""
import json
import os
import subprocess
import sys

import numpy as np
from llama_cpp import Llama

PROMPTS = [
    ("text", "The movie was"),
    ("text", "A young director wanted to make a film about"),
    ("chat", "Write one sentence about the ocean."),
    ("chat", "What is the capital of France?"),
]
NEW = 24
# llama.cpp's default (the prompt in one batch) and token by token.
MODES = {"batch": 512, "token_by_token": 1}
SAME_ORDER = 2.0
# Types whose products llama.cpp computes without quantising activations: tokens must be identical.
FLOAT_TYPES = ("f32", "f16", "bf16")


def preftune(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy(llm, ids):
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == NEW:
            break
    return out


def scores(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def main(binary, hf_dir, out_dir, types):
    os.makedirs(out_dir, exist_ok=True)
    ok = True
    summary = []
    for ty in types:
        path = os.path.join(out_dir, f"model-{ty}.gguf")
        preftune(binary, "export-gguf", "--model", hf_dir, "--out", path, "--type", ty)
        llms = {
            m: Llama(model_path=path, n_ctx=512, n_batch=nb, n_ubatch=nb, n_threads=os.cpu_count(),
                     logits_all=True, verbose=False)
            for m, nb in MODES.items()
        }
        rows = []
        for kind, text in PROMPTS:
            chat = ["--chat"] if kind == "chat" else []
            # The prompt's ids from preftune's tokenizer (with the chat template), fed to both.
            ids = preftune(binary, "inspect", "--model", hf_dir, "--prompt", text, *chat)["ids"]
            cpp = {m: greedy(llm, ids) for m, llm in llms.items()}
            # llama.cpp's own tokenizer (from the GGUF metadata) on the plain prompts.
            cpp_tok = llms["batch"].tokenize(text.encode(), add_bos=False, special=True) if kind == "text" else None
            common = ["--temperature", "0", "--max-new-tokens", str(NEW), "--prompt", text, *chat]
            ours_gguf = preftune(binary, "generate", "--model", path, *common)["ids"]
            ours_hf = preftune(binary, "generate", "--model", hf_dir, *common)["ids"]
            # Teacher-forced along preftune's path: preftune's top 5 at every position, and
            # llama.cpp's logits for those tokens in each of its modes.
            seq = ids + ours_gguf
            cont = ["--continuation-ids", ",".join(map(str, ours_gguf))] if ours_gguf else []
            forced = preftune(binary, "inspect", "--model", path, "--prompt", text, *chat, "--top-k", "5", *cont)
            # The file's tokenizer must give the folder's ids, or positions would not line up.
            assert forced["ids"] == seq, f"{text!r}: the GGUF's tokens differ from the folder's"
            top = forced["top_k"]
            cs = {m: scores(llm, seq) for m, llm in llms.items()}
            pairs = [(logit, cs["batch"][pos][tok], cs["token_by_token"][pos][tok])
                     for pos, best in enumerate(top) for tok, logit in best]
            pt_vs_cpp = np.array([abs(p - a) for p, a, _ in pairs])
            self_diff = np.array([abs(a - b) for _, a, b in pairs])
            # preftune stops at EOS, llama.cpp's generate does not: compare up to preftune's end.
            n = len(ours_gguf)
            row = {
                "prompt": text,
                "chat": kind == "chat",
                "llama_cpp": cpp["batch"],
                "llama_cpp_token_by_token": cpp["token_by_token"],
                "preftune_gguf": ours_gguf,
                "preftune_hf": ours_hf,
                "same_as_preftune_gguf": cpp["batch"][:n] == ours_gguf,
                "llama_cpp_same_as_itself": cpp["batch"] == cpp["token_by_token"],
                "tokens_agreeing_with_preftune_hf": first_difference(cpp["batch"], ours_hf),
                "max_logit_diff_preftune_vs_llama_cpp": round(float(pt_vs_cpp.max()), 4),
                "max_logit_diff_llama_cpp_vs_itself": round(float(self_diff.max()), 4),
                "mean_logit_diff_preftune_vs_llama_cpp": round(float(pt_vs_cpp.mean()), 4),
                "mean_logit_diff_llama_cpp_vs_itself": round(float(self_diff.mean()), 4),
                "text": llms["batch"].detokenize(cpp["batch"]).decode(errors="replace"),
            }
            if cpp_tok is not None:
                row["tokenizer_same"] = cpp_tok == ids
            if not row["same_as_preftune_gguf"]:
                # Where the paths part: llama.cpp's logits there (its own prefix), its pick against
                # preftune's.
                d = first_difference(cpp["batch"], ours_gguf)
                s = scores(llms["batch"], ids + cpp["batch"][:d])[-1]
                row["first_divergence"] = d
                row["llama_cpp_logit_gap_there"] = round(abs(float(s[cpp["batch"][d]] - s[ours_gguf[d]])), 4)
            rows.append(row)
        self_max = max(r["max_logit_diff_llama_cpp_vs_itself"] for r in rows)
        pt_max = max(r["max_logit_diff_preftune_vs_llama_cpp"] for r in rows)
        quantised = ty not in FLOAT_TYPES
        for r in rows:
            good = r["same_as_preftune_gguf"] or quantised and r["llama_cpp_logit_gap_there"] <= self_max
            ok &= good and r.get("tokenizer_same", True)
        if quantised:
            ok &= pt_max <= SAME_ORDER * self_max
        print(json.dumps({"type": ty, "file_bytes": os.path.getsize(path), "rows": rows}))
        summary.append({
            "type": ty,
            "prompts": len(rows),
            "identical_to_preftune_on_the_gguf": sum(r["same_as_preftune_gguf"] for r in rows),
            "llama_cpp_identical_to_itself": sum(r["llama_cpp_same_as_itself"] for r in rows),
            "divergence_logit_gaps": [r.get("llama_cpp_logit_gap_there") for r in rows],
            "max_logit_diff_preftune_vs_llama_cpp": pt_max,
            "max_logit_diff_llama_cpp_vs_itself": self_max,
            "mean_logit_diff_preftune_vs_llama_cpp": [r["mean_logit_diff_preftune_vs_llama_cpp"] for r in rows],
            "mean_logit_diff_llama_cpp_vs_itself": [r["mean_logit_diff_llama_cpp_vs_itself"] for r in rows],
            "llama_cpp_token_by_token_first_difference": [
                first_difference(r["llama_cpp"], r["llama_cpp_token_by_token"]) for r in rows],
            "tokens_agreeing_with_preftune_hf": [r["tokens_agreeing_with_preftune_hf"] for r in rows],
        })
        del llms
    print(json.dumps({"summary": summary, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:] or ["f16", "q8_0"]))
