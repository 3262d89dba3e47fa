"""Our logits against transformers' on the same random-weight checkpoint and token ids.

For each checkpoint: sequences of different lengths; bsa runs a prefill of PREFILL tokens
then one decode step per remaining token (`bsa dev logits`), transformers runs the whole
sequence at once; the logits of positions PREFILL-1 .. len-1 are compared. Reported per
checkpoint: relative error ||ours - ref|| / ||ref|| per position (max and mean) against
transformers in bf16 and against transformers in f32 (the bf16 checkpoint upcast: the
more exact reference), the bf16-vs-f32 error of transformers itself (the floor), and the
argmax agreement. Pass: max relative error against the f32 reference < 1e-2.

usage: parity.py BSA_BIN CKPT_ROOT OUT_JSON [names...]
"""
import json, os, subprocess, sys, tempfile, time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

PREFILL = 24
LENGTHS = [40, 33, 57, 26]  # different lengths in one batch: no padding on our side


def ref_logits(d, seqs):
    """transformers' logits in bf16, then in f32 (the same weights upcast on the GPU)."""
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    outs = []
    for _ in range(2):
        out = []
        with torch.no_grad():
            for s in seqs:
                lg = m(torch.tensor([s], device="cuda")).logits[0].float()
                out.append(lg[PREFILL - 1:].cpu().numpy())
        outs.append(out)
        m = m.float()
    del m
    torch.cuda.empty_cache()
    return outs


def rel(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def main():
    bsa, root, out_json = sys.argv[1:4]
    names = sys.argv[4:] or sorted(os.listdir(root))
    results = {}
    for name in names:
        d = os.path.join(root, name)
        cfg = json.load(open(os.path.join(d, "config.json")))
        rng = np.random.default_rng(len(name))
        seqs = [rng.integers(0, cfg["vocab_size"], n).tolist() for n in LENGTHS]
        r = {"checkpoint": name}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tok = os.path.join(tmp, "tokens.json")
                json.dump(seqs, open(tok, "w"))
                dump = os.path.join(tmp, "ours.f32")
                t = time.time()
                p = subprocess.run([bsa, "dev", "logits", "--model", d, "--tokens", tok, "--prefill", str(PREFILL),
                                    "--out", dump, "--device", "cuda", "--dtype", "bf16"], capture_output=True, text=True)
                r["bsa_s"] = round(time.time() - t, 2)
                if p.returncode != 0:
                    raise RuntimeError(f"bsa dev logits failed ({p.returncode}): {p.stderr[-2000:]}")
                ours = np.fromfile(dump, dtype="<f4").reshape(-1, cfg["vocab_size"])
            ref16, ref32 = ref_logits(d, seqs)
            split = np.cumsum([n - PREFILL + 1 for n in LENGTHS])[:-1]
            ours_s = np.split(ours, split)
            e16 = np.concatenate([rel(o, b) for o, b in zip(ours_s, ref16)])
            e32 = np.concatenate([rel(o, b) for o, b in zip(ours_s, ref32)])
            floor = np.concatenate([rel(a, b) for a, b in zip(ref16, ref32)])
            argmax = np.mean(np.concatenate([o.argmax(-1) == b.argmax(-1) for o, b in zip(ours_s, ref32)]))
            # Prefill row (first of each sequence) vs decode rows, against f32.
            first = np.array([rel(o[:1], b[:1])[0] for o, b in zip(ours_s, ref32)])
            r.update({
                "positions": int(ours.shape[0]),
                "rel_err_vs_hf_bf16_max": float(e16.max()), "rel_err_vs_hf_bf16_mean": float(e16.mean()),
                "rel_err_vs_hf_f32_max": float(e32.max()), "rel_err_vs_hf_f32_mean": float(e32.mean()),
                "rel_err_prefill_rows_vs_hf_f32_max": float(first.max()),
                "hf_bf16_vs_hf_f32_max": float(floor.max()),
                "argmax_agreement_vs_hf_f32": float(argmax),
                "pass": bool(e32.max() < 1e-2),
            })
        except Exception as e:  # keep going: one failing checkpoint must not hide the others
            r.update({"error": str(e), "pass": False})
        print(json.dumps(r), file=sys.stderr)
        results[name] = r
    json.dump(results, open(out_json, "w"), indent=1)


if __name__ == "__main__":
    main()
