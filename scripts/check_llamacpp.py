"""llama.cpp itself runs what `preftune export-gguf` writes: for each type, export the model, then
decode greedily in llama.cpp (through llama-cpp-python, built from its sdist, which vendors
llama.cpp's source) and in preftune from the same GGUF file and from the original folder, on the
same prompt token ids, and compare the tokens. f16 must agree token for token. On quantised
types llama.cpp also quantises the activations (its q8_0 dot products are int8 x int8), so greedy
paths may part at a near tie: where they do, the script reports llama.cpp's own logit gap
between its token and preftune's, and fails only if that gap is large (> 1.0).

Usage: python scripts/check_llamacpp.py PREFTUNE_BIN HF_DIR OUT_DIR [TYPE...]   (default f16 q8_0)
Needs llama-cpp-python (scripts/check_llamacpp.sh builds it). Prints one JSON object per type and a
summary; exits 1 if llama.cpp's tokens differ from preftune's on the same file."""
import json
import os
import subprocess
import sys

from llama_cpp import Llama

PROMPTS = [
    ("text", "The movie was"),
    ("text", "A young director wanted to make a film about"),
    ("chat", "Write one sentence about the ocean."),
    ("chat", "What is the capital of France?"),
]
NEW = 24


def preftune(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(binary, hf_dir, out_dir, types):
    os.makedirs(out_dir, exist_ok=True)
    ok = True
    summary = []
    for ty in types:
        path = os.path.join(out_dir, f"model-{ty}.gguf")
        preftune(binary, "export-gguf", "--model", hf_dir, "--out", path, "--type", ty)
        llm = Llama(model_path=path, n_ctx=512, n_threads=os.cpu_count(), logits_all=True, verbose=False)
        rows = []
        for kind, text in PROMPTS:
            chat = ["--chat"] if kind == "chat" else []
            # The prompt's ids from preftune's tokenizer (with the chat template), fed to both.
            ids = preftune(binary, "inspect", "--model", hf_dir, "--prompt", text, *chat)["ids"]
            cpp = []
            for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                cpp.append(int(t))
                if len(cpp) == NEW:
                    break
            # llama.cpp's own tokenizer (from the GGUF metadata) on the plain prompts.
            cpp_tok = llm.tokenize(text.encode(), add_bos=False, special=True) if kind == "text" else None
            common = ["--temperature", "0", "--max-new-tokens", str(NEW), "--prompt", text, *chat]
            ours_gguf = preftune(binary, "generate", "--model", path, *common)["ids"]
            ours_hf = preftune(binary, "generate", "--model", hf_dir, *common)["ids"]
            agree = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            row = {
                "prompt": text,
                "chat": kind == "chat",
                "llama_cpp": cpp,
                "preftune_gguf": ours_gguf,
                "preftune_hf": ours_hf,
                # preftune stops at EOS, llama.cpp's generate does not: compare up to preftune's end.
                "same_as_preftune_gguf": cpp[: len(ours_gguf)] == ours_gguf,
                "tokens_agreeing_with_preftune_hf": agree(cpp, ours_hf),
                "text": llm.detokenize(cpp).decode(errors="replace"),
            }
            if cpp_tok is not None:
                row["tokenizer_same"] = cpp_tok == ids
            same = row["same_as_preftune_gguf"]
            if not same:
                # Where the paths part: llama.cpp's logits there, its pick against preftune's.
                d = agree(cpp, ours_gguf)
                llm.reset()
                llm.eval(ids + cpp[:d])
                scores = llm.scores[len(ids) + d - 1]
                row["first_divergence"] = d
                # (Re-evaluated as one batch, so it may differ in sign from the incremental pass.)
                row["llama_cpp_logit_gap_there"] = abs(float(scores[cpp[d]] - scores[ours_gguf[d]]))
            near_tie = not same and row["llama_cpp_logit_gap_there"] <= 1.0 and ty != "f16"
            ok &= (same or near_tie) and row.get("tokenizer_same", True)
            rows.append(row)
        res = {"type": ty, "file_bytes": os.path.getsize(path), "rows": rows}
        print(json.dumps(res))
        summary.append({
            "type": ty,
            "prompts": len(rows),
            "identical_to_preftune_on_the_gguf": sum(r["same_as_preftune_gguf"] for r in rows),
            "divergence_logit_gaps": [r.get("llama_cpp_logit_gap_there") for r in rows],
            "tokens_agreeing_with_preftune_hf": [r["tokens_agreeing_with_preftune_hf"] for r in rows],
        })
        del llm
    print(json.dumps({"summary": summary, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:] or ["f16", "q8_0"]))
