#!/usr/bin/env python3
"""Issue 3's speed targets, measured side by side in one run: `bsa bench engine` against
llama.cpp (scripts/bench_llamacpp.py) on the same GGUF, same thread count, alternating
rounds so that whatever else the machine does hits both alike. Prints each round and the
median ratios:
  - single stream decode (greedy, 100-token prompt, --new-tokens): target >= 0.8x llama.cpp;
  - the BSA-like job (every item of --data x 5 samples x --new-tokens, end of sequence
    ignored): bsa batched against llama.cpp one sequence at a time: target >= 3x.

    scripts/bench_side_by_side.py --python /path/to/venv/bin/python [--rounds 3]
(the venv needs llama-cpp-python==0.3.36; see bench_llamacpp.py). Build bsa with
`cargo build --release` first.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LINE = re.compile(r"^(?P<what>[^:]+(?::[^:]+)?): (?P<seqs>\d+) sequences, (?P<p>\d+) prompt \+ (?P<n>\d+) new tokens in "
                  r"(?P<s>[\d.]+) s; prefill (?P<pf>[\d.]+) tok/s, decode (?P<dec>[\d.]+) tok/s, overall (?P<all>[\d.]+) new tok/s")


def run_bsa(bsa, model, data, samples, new_tokens, batch, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([bsa, "bench", "engine", "--model", model, "--batch-sizes", "1", "--new-tokens", str(new_tokens),
                          "--job-data", data, "--job-samples", str(samples), "--job-batch", str(batch)],
                         env=env, check=True, capture_output=True, text=True).stdout
    rows = [m.groupdict() for m in map(LINE.match, out.splitlines()) if m]
    if len(rows) != 2:
        sys.exit(f"unexpected `bsa bench engine` output:\n{out}")
    single, job = rows
    return {"single_prefill": float(single["pf"]), "single_decode": float(single["dec"]),
            "job_tok_s": float(job["all"]), "job_s": float(job["s"]), "job_tokens": int(job["n"])}


def run_llamacpp(python, gguf, data, samples, new_tokens, threads):
    out = subprocess.run([python, os.path.join(HERE, "bench_llamacpp.py"), "--gguf", gguf, "--threads", str(threads),
                          "--new-tokens", str(new_tokens), "--job-data", data, "--job-samples", str(samples)],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return {"single_prefill": r["single_stream"]["prefill_tok_s"], "single_decode": r["single_stream"]["decode_tok_s"],
            "job_tok_s": r["job_one_at_a_time"]["tok_s"], "job_s": r["job_one_at_a_time"]["seconds"],
            "job_tokens": r["job_one_at_a_time"]["new_tokens"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", required=True, help="a python with llama-cpp-python installed")
    ap.add_argument("--bsa", default=os.path.join(ROOT, "target", "release", "bsa"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/bsa/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "sample.csv"))
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rounds = []
    for i in range(a.rounds):
        ours = run_bsa(a.bsa, a.model, a.data, a.samples, a.new_tokens, a.batch, a.threads)
        theirs = run_llamacpp(a.python, a.gguf, a.data, a.samples, a.new_tokens, a.threads)
        r = {"round": i + 1, "bsa": ours, "llama_cpp": theirs,
             "single_decode_ratio": ours["single_decode"] / theirs["single_decode"],
             "single_prefill_ratio": ours["single_prefill"] / theirs["single_prefill"],
             "job_ratio": theirs["job_s"] / ours["job_s"] * ours["job_tokens"] / max(theirs["job_tokens"], 1)}
        rounds.append(r)
        print(json.dumps(r), flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("single_decode_ratio", "single_prefill_ratio", "job_ratio")}
    print(f"median over {a.rounds} rounds, {a.threads} threads: single-stream decode {med['single_decode_ratio']:.2f}x llama.cpp "
          f"(target >= 0.8), prefill {med['single_prefill_ratio']:.2f}x, BSA-like job {med['job_ratio']:.2f}x llama.cpp one at a time "
          f"(target >= 3)")
    print(json.dumps({"median": med}))


if __name__ == "__main__":
    main()
