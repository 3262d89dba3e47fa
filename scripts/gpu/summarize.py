"""Collects the JSON files of one check.sh run into summary.json and a markdown table
(summary.md): parity, sampler agreement / statistics / speed against its bandwidth floor
and torch, engine throughput against transformers and the memory-bandwidth roofline.

usage: summarize.py OUT_DIR CKPT_7B_DIR"""
import json, os, sys

out, ckpt = sys.argv[1:3]


def load(name):
    p = os.path.join(out, name)
    try:
        return json.load(open(p))
    except Exception as e:
        return {"missing": f"{name}: {e}"}


bw = load("bandwidth.json")
parity = load("parity.json")
sampler = load("sampler.json")
torch_s = load("sampler_torch.json")
engine = load("engine.json")
hf = load("hf_generate.json")
mem = load("bsa_peak_mem.json")
copy_bw = bw.get("copy_bytes_per_s")
s = {"gpu": bw.get("gpu"), "bandwidth": bw, "parity": parity, "peak_mem": mem}
md = [f"# bsa GPU check on {bw.get('gpu')}", "",
      f"copy bandwidth {bw.get('copy_gb_s', float('nan')):.0f} GB/s, bf16 matmul {bw.get('bf16_matmul_tflops', float('nan')):.0f} TFLOP/s", ""]

md += ["## Parity with transformers (relative logit error, bf16)", "",
       "| checkpoint | vs HF f32 max | vs HF bf16 max | HF bf16 vs f32 | argmax agree | pass |", "|---|---|---|---|---|---|"]
for name, r in (parity.items() if isinstance(parity, dict) else []):
    if not isinstance(r, dict) or "rel_err_vs_hf_f32_max" not in r:
        md.append(f"| {name} | error: {str(r.get('error', r) if isinstance(r, dict) else r)[:80]} | | | | no |")
        continue
    md.append(f"| {name} | {r['rel_err_vs_hf_f32_max']:.2e} | {r['rel_err_vs_hf_bf16_max']:.2e} | {r['hf_bf16_vs_hf_f32_max']:.2e} | {r['argmax_agreement_vs_hf_f32']:.3f} | {r['pass']} |")

md += ["", "## Sampler [256 x 152064] f32", "",
       "| params | call ms (kernel ms) | floor ms | kernel x floor | torch ms | x faster than torch | differ vs Rust model | differ vs exact CPU | chi2 p |",
       "|---|---|---|---|---|---|---|---|---|"]
s["sampler"] = []
for st in sampler.get("sets", []):
    floor = sampler["logit_bytes"] / copy_bw if copy_bw else None
    t = torch_s.get("sets", {}).get(st["params"], {}).get("best_s")
    kern = st.get("kernel_only_s") or st["best_s"]
    row = {"params": st["params"], "best_s": st["best_s"], "kernel_only_s": st.get("kernel_only_s"), "floor_s": floor,
           "x_floor": kern / floor if floor else None,
           "torch_best_s": t, "x_faster_than_torch": t / st["best_s"] if t else None,
           "differ_vs_model": st["tokens_differ_from_rust_model"], "differ_vs_exact": st["tokens_differ_from_exact_cpu_sampler"],
           "chi_p": [c["p_value"] for c in st["chi_square"]]}
    s["sampler"].append(row)
    f = lambda x, k=1e3: f"{x * k:.3f}" if x else "-"
    md.append(f"| {st['params']} | {f(st['best_s'])} ({f(st.get('kernel_only_s'))}) | {f(floor)} | {f(row['x_floor'], 1)} | {f(t)} | {f(row['x_faster_than_torch'], 1)} | "
              f"{row['differ_vs_model']} / {st['rows']} | {row['differ_vs_exact']} / {st['rows']} | {', '.join(f'{p:.3g}' for p in row['chi_p'])} |")

# Roofline per decode step: weights (all but the embedding table, of which only the batch's
# rows are read) + the KV cache read by attention, over the copy bandwidth.
cfg = json.load(open(os.path.join(ckpt, "config.json"))) if os.path.exists(os.path.join(ckpt, "config.json")) else None
md += ["", "## Engine on the Qwen2.5-7B shape (bf16): bsa vs transformers generate", "",
       "| batch | bsa prefill tok/s | bsa decode tok/s | HF prefill tok/s | HF decode tok/s | x HF | bsa % roofline |", "|---|---|---|---|---|---|---|"]
s["engine"] = []
hf_runs = {r["batch"]: r for r in hf.get("runs", [])}
best_hf = max((r.get("decode_tok_s", 0) for r in hf_runs.values()), default=0)
for r in engine.get("runs", []):
    row = {"batch": r["batch"], "bsa": r, "hf": hf_runs.get(r["batch"])}
    if cfg and copy_bw:
        h, L, kvh = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
        params = L * (h * h * 2 + 2 * h * kvh * hd + 3 * h * cfg["intermediate_size"]) + cfg["vocab_size"] * h
        weight_bytes = params * 2
        prompt = len(r["prompts"][0]) if r["prompts"] else 0
        ctx = prompt + engine["new_tokens"] / 2
        kv_bytes = r["sequences"] * ctx * L * 2 * kvh * hd * 2
        step_s = r["sequences"] / r["decode_tok_s"]
        row["roofline_pct"] = 100 * (weight_bytes + kv_bytes) / copy_bw / step_s
        row["bytes_per_step"] = weight_bytes + kv_bytes
    hfr = hf_runs.get(r["batch"], {})
    row["x_best_hf"] = r["decode_tok_s"] / best_hf if best_hf else None
    s["engine"].append(row)
    g = lambda x: f"{x:.0f}" if isinstance(x, (int, float)) else "-"
    md.append(f"| {r['batch']} | {g(r['prefill_tok_s'])} | {g(r['decode_tok_s'])} | {g(hfr.get('prefill_tok_s'))} | {g(hfr.get('decode_tok_s'))} | "
              f"{row['x_best_hf']:.2f} | {g(row.get('roofline_pct'))} |" if row["x_best_hf"] else
              f"| {r['batch']} | {g(r['prefill_tok_s'])} | {g(r['decode_tok_s'])} | {g(hfr.get('prefill_tok_s'))} | {g(hfr.get('decode_tok_s'))} | - | {g(row.get('roofline_pct'))} |")
md += ["", f"peak GPU memory: bsa {mem.get('bsa_engine_peak_mib', '-')} MiB (nvidia-smi), "
       f"HF {max((r.get('peak_mem_bytes', 0) for r in hf_runs.values()), default=0) / 2**20:.0f} MiB (torch max allocated)"]
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=1)
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
