"""The `openai` Python package (PyPI) against `bsa serve`: what real harnesses do.

Usage: python openai_sdk.py BASE_URL MODEL
Run by tests/serve.rs (openai_python_package_interoperates) with the venv of
scripts/openai-venv.sh. Prints a JSON summary; any failed check raises (exit status 1).
"""

import collections
import concurrent.futures
import json
import sys
import time
import urllib.request

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
msgs = [{"role": "user", "content": "Tell me about the moon in one sentence."}]
summary = {"openai_version": openai.__version__}


def stats():
    with urllib.request.urlopen(base.removesuffix("/v1") + "/health") as r:
        return json.load(r)["stats"]


# The model routes: list and retrieve.
assert [m.id for m in client.models.list()] == [model]
m = client.models.retrieve(model)
assert (m.id, m.object) == (model, "model"), m
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("retrieving an unknown model succeeded")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

# Plain.
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, seed=1)
assert r.object == "chat.completion" and len(r.choices) == 1, r
assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
summary["plain"] = r.choices[0].message.content

# n > 1, streamed and not, same seed: the deltas put together are the answer.
args = dict(model=model, messages=msgs, max_tokens=24, temperature=0.9, seed=7, n=3)
whole = client.chat.completions.create(**args)
assert [c.index for c in whole.choices] == [0, 1, 2], whole
stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
content, finish, usage = ["", "", ""], [None] * 3, None
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        content[c.index] += c.delta.content or ""
        if c.finish_reason:
            finish[c.index] = c.finish_reason
assert content == [c.message.content for c in whole.choices], (content, whole)
assert finish == [c.finish_reason for c in whole.choices], finish
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
summary["streamed_choices"] = len(content)

# vLLM's extensions through extra_body, max_completion_tokens, logprobs.
r = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=3, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True})
assert r.usage.completion_tokens == 3, r.usage
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
assert len(lp) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp), lp

# Errors come back as the SDK's typed exceptions, with the parameter named.
try:
    client.chat.completions.create(model=model, messages=msgs, presence_penalty=0.5)
    raise AssertionError("presence_penalty 0.5 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "presence_penalty" in str(e), e
try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e

# 32 concurrent requests on one client (its connection pool keeps them alive), twice.
before = stats()


def one(i):
    return client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0.7, seed=i, extra_body={"ignore_eos": True}).usage.completion_tokens


with concurrent.futures.ThreadPoolExecutor(32) as pool:
    for _ in range(2):
        assert list(pool.map(one, range(32))) == [16] * 32
after = stats()
steps = after["decode_steps"] - before["decode_steps"]
tokens = after["decode_tokens"] - before["decode_tokens"]
connections = after["accepted_connections"] - before["accepted_connections"]
summary["concurrent"] = {"requests": 64, "connections": connections, "mean_decode_batch": round(tokens / steps, 1)}
# 32 connections for 64 requests (the second round reuses the first's), and the stats call.
assert connections <= 33, summary
# Streams too on the pool.
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    def streamed(i):
        s = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    texts = list(pool.map(streamed, range(8)))
assert len(set(texts)) == 1, texts
# Overload: 128 clients at once against --max-queue 64, with the SDK's default retries (2,
# honouring Retry-After): every request gets through. (With a fixed Retry-After of 1 s,
# 192 of 256 failed this way.)
refusals = []
t0 = time.monotonic()


def note_refusal(response):
    if response.status_code == 429:
        refusals.append((round(time.monotonic() - t0, 1), response.headers.get("retry-after")))


# The SDK's own HTTP client, with a hook that notes each 429 (when, and the Retry-After).
http = openai.DefaultHttpxClient(event_hooks={"response": [note_refusal]})
patient = openai.OpenAI(base_url=base, api_key="unused", timeout=600, http_client=http)
before = stats()


def flood(i):
    try:
        patient.chat.completions.create(model=model, messages=msgs, max_tokens=32, temperature=0.7, seed=i, extra_body={"ignore_eos": True})
        return True
    except openai.APIError:
        return False


with concurrent.futures.ThreadPoolExecutor(128) as pool:
    ok = list(pool.map(flood, range(128)))
after = stats()
summary["overload"] = {"requests": 128, "failed": ok.count(False), "rejected_429": after["rejected_busy"] - before["rejected_busy"], "seconds": round(time.monotonic() - t0, 1)}
summary["overload"]["refusals (s, Retry-After): count"] = sorted(collections.Counter(refusals).items())
assert all(ok), summary
print(json.dumps(summary))
