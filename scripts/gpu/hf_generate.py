"""transformers `generate` on the same checkpoint and token ids as `bsa bench engine`
(read from its JSON): for each batch, the same prompts, SAMPLES sequences each, sampling
at T 0.6 / top-p 0.95, exactly NEW tokens (EOS ignored). Prefill is timed as generate with
one new token; decode tok/s = (tokens after the first) / (total - prefill time).

usage: hf_generate.py CKPT BSA_ENGINE_JSON OUT_JSON"""
import json, sys, time

import torch
from transformers import AutoModelForCausalLM

ckpt, bsa_json, out_json = sys.argv[1:4]
runs = json.load(open(bsa_json))
samples, new = runs["samples"], runs["new_tokens"]
m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
res = {"samples": samples, "new_tokens": new, "runs": []}
for run in runs["runs"]:
    ids = torch.tensor(run["prompts"], device="cuda")

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.6, top_p=0.95, top_k=0,
                         num_return_sequences=samples, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    torch.cuda.reset_peak_memory_stats()
    try:
        gen(1)
        prefill_s, _ = gen(1)
        total_s, out = gen(new)
        seqs = out.shape[0]
        produced = (out.shape[1] - ids.shape[1]) * seqs
        r = {"batch": run["batch"], "sequences": seqs, "prefill_s": prefill_s, "total_s": total_s,
             "prefill_tok_s": ids.numel() / prefill_s, "decode_tok_s": (produced - seqs) / (total_s - prefill_s),
             "peak_mem_bytes": torch.cuda.max_memory_allocated()}
    except torch.cuda.OutOfMemoryError as e:
        r = {"batch": run["batch"], "error": f"out of memory: {e}"[:300]}
        torch.cuda.empty_cache()
    print(json.dumps(r), file=sys.stderr)
    res["runs"].append(r)
json.dump(res, open(out_json, "w"), indent=1)
