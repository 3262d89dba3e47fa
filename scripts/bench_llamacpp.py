#!/usr/bin/env python3
"""The llama.cpp side of `bsa bench engine`, for side-by-side ratios on one machine.

Needs llama-cpp-python (PyPI; it builds llama.cpp from source, ~30 minutes on 2 cores):
    python3 -m venv .venv-bench && .venv-bench/bin/pip install llama-cpp-python==0.3.36
    .venv-bench/bin/python scripts/bench_llamacpp.py --gguf PATH [--threads 2]

Measures, greedy with end-of-sequence ignored, like `bsa bench engine`:
  - single stream: a synthetic prompt of --prompt-len tokens, then --new-tokens tokens
    (prefill and decode tok/s reported separately);
  - the BSA-like job one sequence at a time: every item of --job-data x --job-samples
    samples, --new-tokens each, the chat template applied by llama.cpp itself.
"""
import argparse
import csv
import json
import time

from llama_cpp import Llama


def single_stream(llm, prompt_len, new_tokens):
    vocab = llm.n_vocab()
    prompt = [((j * 104729) % (vocab - 1)) + 1 for j in range(prompt_len)]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    produced = 0
    for _ in range(new_tokens):
        logits = llm.scores[llm.n_tokens - 1]
        tok = int(logits.argmax())
        llm.eval([tok])
        produced += 1
    t2 = time.perf_counter()
    return {"prefill_tok_s": prompt_len / (t1 - t0), "decode_tok_s": produced / (t2 - t1), "new_tokens": produced}


def job(llm, data, samples, new_tokens):
    rows = list(csv.DictReader(open(data, encoding="utf-8")))
    # End of sequence banned so every sample makes new_tokens, as in `bsa bench engine`.
    stops = {llm.token_eos()} | {t for s in (b"<|im_end|>", b"<|endoftext|>") for t in llm.tokenize(s, add_bos=False, special=True)[:1]}
    bias = {t: -1e9 for t in stops}
    produced = 0
    t0 = time.perf_counter()
    for row in rows:
        for _ in range(samples):
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": row["query"]}],
                max_tokens=new_tokens, temperature=0.2, top_p=0.9, logit_bias=bias,
            )
            produced += out["usage"]["completion_tokens"]
    secs = time.perf_counter() - t0
    return {"queries": len(rows), "samples": samples, "new_tokens": produced, "seconds": secs, "tok_s": produced / secs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--job-data")
    ap.add_argument("--job-samples", type=int, default=5)
    a = ap.parse_args()
    llm = Llama(model_path=a.gguf, n_ctx=2048, n_threads=a.threads, n_batch=512, logits_all=True, verbose=False)
    res = {"single_stream": single_stream(llm, a.prompt_len, a.new_tokens)}
    if a.job_data:
        res["job_one_at_a_time"] = job(llm, a.job_data, a.job_samples, a.new_tokens)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
