"""Writes the sampler benchmark's logits ([ROWS x VOCAB] f32, LLM-like) for bsa to read, and
times torch's sort-based top-k/top-p sampling on the same data (the usual
transformers/vLLM-style implementation: sort, softmax, cumsum, mask, multinomial).

usage: sampler_torch.py LOGITS_OUT OUT_JSON [ROWS VOCAB]"""
import json, sys, time

import torch

out, out_json = sys.argv[1:3]
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 256
vocab = int(sys.argv[4]) if len(sys.argv) > 4 else 152064
g = torch.Generator(device="cuda").manual_seed(5)
logits = torch.randn(rows, vocab, device="cuda", generator=g) * 2.0
spikes = torch.rand(rows, vocab, device="cuda", generator=g) < 1 / 2000
logits = logits + spikes * 8.0
logits.cpu().numpy().astype("<f4").tofile(out)


def sort_based(l, t, top_k, top_p):
    l = l / t
    if top_k:
        kth = torch.topk(l, top_k, dim=-1).values[:, -1:]
        l = l.masked_fill(l < kth, float("-inf"))
    s, idx = torch.sort(l, descending=True, dim=-1)
    p = s.softmax(-1)
    c = p.cumsum(-1)
    s = s.masked_fill((c - p) > top_p, float("-inf"))
    choice = torch.multinomial(s.softmax(-1), 1)
    return idx.gather(-1, choice)


res = {"rows": rows, "vocab": vocab, "logit_bytes": rows * vocab * 4, "sets": {}}
for name, k in [("T=0.6 top-k 20 top-p 0.95", 20), ("T=0.6 top-p 0.95", 0)]:
    times = []
    for _ in range(3):
        sort_based(logits, 0.6, k, 0.95)
    for _ in range(20):
        torch.cuda.synchronize()
        t = time.perf_counter()
        sort_based(logits, 0.6, k, 0.95).cpu()
        times.append(time.perf_counter() - t)
    times.sort()
    res["sets"][name] = {"best_s": times[0], "median_s": times[len(times) // 2]}
json.dump(res, open(out_json, "w"), indent=1)
print(json.dumps(res))
