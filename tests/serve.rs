//! `bsa serve` with the real SmolLM2-135M-Instruct GGUF on 127.0.0.1: `bsa generate` and
//! `bsa judge` through it, an OpenAI-style 4xx for every kind of bad request while it keeps
//! serving, and 64 concurrent clients all answered within the server's queue bound.

mod common;
use common::smollm2;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bsa::backends::openai::{ChatRequest, Client, ClientOptions, Endpoint};
use bsa::prompt::Message;
use serde_json::{json, Value};

/// A `bsa serve` process on a free port, killed when dropped.
struct Served {
    child: Child,
    /// `http://127.0.0.1:PORT/v1`
    base: String,
}

impl Served {
    /// Served as `smollm2-135m`, with a 256 MiB KV cache.
    fn start(model: &PathBuf, extra: &[&str]) -> Served {
        Served::spawn(&[&["--model", model.to_str().unwrap(), "--served-model-name", "smollm2-135m", "--kv-cache-mb", "256"], extra].concat())
    }

    /// `bsa serve ARGS --port 0`, once it says where it listens.
    fn spawn(args: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bsa"))
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
        Served { child, base }
    }

    /// `127.0.0.1:PORT`
    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").trim_end_matches("/v1").to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.trim_end_matches("/v1"))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, body and Retry-After of one request (no retries).
fn send(url: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value, Option<String>) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(300)).build();
    let mut req = if body.is_some() { agent.post(url) } else { agent.get(url) };
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let r = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("Retry-After").map(str::to_string);
    let text = resp.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}")), retry)
}

fn chat_body(extra: Value) -> String {
    let mut b = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

/// An error in the OpenAI shape, with the expected status and param.
fn assert_error(got: &(u16, Value, Option<String>), status: u16, param: Option<&str>, what: &str) {
    let (s, body, _) = got;
    assert_eq!(*s, status, "{what}: {body}");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(), "{what}: {body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: param and code keys are present: {body}");
    if let Some(p) = param {
        assert_eq!(e["param"].as_str(), Some(p), "{what}: {body}");
    }
}

fn bsa(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bsa"));
    c.args(args).current_dir(env!("CARGO_MANIFEST_DIR")).env_remove("OPENAI_API_KEY");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn generate_and_judge_through_bsa_serve() {
    let Some(model) = smollm2() else { return };
    const KEY: &str = "sk-serve-test-c0ffee";
    let server = Served::start(&model, &["--api-key", KEY]);
    let backend = format!("openai:smollm2-135m@{}", server.base);
    let dir = tempfile::tempdir().unwrap();
    let env = [("OPENAI_API_KEY", KEY)];
    let gen = |out: &std::path::Path| {
        bsa(&["generate", "--backend", &backend, "--scenario", "RO", "--limit", "2", "--samples", "2", "--temperature", "0.8",
            "--max-new-tokens", "5", "--quiet", "--out", out.to_str().unwrap()], &env)
    };
    let a = dir.path().join("a");
    let stdout = ok(&gen(&a));
    assert!(stdout.contains("wrote 4 samples"), "{stdout}");
    let recs = records(&a.join("samples.jsonl"));
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert!(r["completion_tokens"].as_u64().unwrap() <= 5 && r["prompt_tokens"].as_u64().unwrap() > 10, "{r}");
        assert!(r["finish_reason"] == "length" || r["finish_reason"] == "stop", "{r}");
        assert_eq!(r["thinking"], "", "SmolLM2 does not think: {r}");
    }
    // Each sample carries its own seed, so a second run through the server says the same.
    let b = dir.path().join("b");
    ok(&gen(&b));
    let text = |recs: &[Value]| {
        let mut t: Vec<(String, u64, String)> = recs.iter().map(|r| (r["item_id"].as_str().unwrap().into(), r["sample_index"].as_u64().unwrap(), r["raw"].as_str().unwrap().into())).collect();
        t.sort();
        t
    };
    assert_eq!(text(&recs), text(&records(&b.join("samples.jsonl"))));
    // bsa's client streaming (--stream) from bsa serve streaming: the same samples.
    let streamed = dir.path().join("streamed");
    let o = bsa(&["generate", "--backend", &backend, "--stream", "--scenario", "RO", "--limit", "2", "--samples", "2", "--temperature", "0.8",
        "--max-new-tokens", "5", "--quiet", "--out", streamed.to_str().unwrap()], &env);
    ok(&o);
    let streamed = records(&streamed.join("samples.jsonl"));
    assert_eq!(text(&recs), text(&streamed));
    let usage = |recs: &[Value]| {
        let mut u: Vec<(String, u64, u64, u64, String)> = recs
            .iter()
            .map(|r| (r["item_id"].as_str().unwrap().into(), r["sample_index"].as_u64().unwrap(), r["prompt_tokens"].as_u64().unwrap(), r["completion_tokens"].as_u64().unwrap(), r["finish_reason"].as_str().unwrap().into()))
            .collect();
        u.sort();
        u
    };
    assert_eq!(usage(&recs), usage(&streamed), "usage and finish reasons from the stream's chunks");
    // A rerun has nothing left to do.
    assert!(ok(&gen(&a)).contains("nothing to do"));

    let judge = format!("openai:smollm2-135m@{}", server.base);
    let stdout = ok(&bsa(&["judge", a.to_str().unwrap(), "--judge", &judge, "--judge-max-new-tokens", "8", "--judge-retries", "0", "--quiet"], &env));
    assert!(stdout.contains("judged 4 samples"), "{stdout}");
    let verdicts = records(&a.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 4);
    for v in &verdicts {
        assert_eq!(v["judge"], "smollm2-135m");
        assert!(v["raw_safety"].is_string() && v["prompt_sha256"].as_str().unwrap().len() == 64, "{v}");
        assert!(v["safety"].is_null() || v["safety"] == "Safe" || v["safety"] == "Unsafe", "{v}");
    }
    for f in ["manifest.json", "samples.jsonl", "verdicts.jsonl"] {
        assert!(!std::fs::read_to_string(a.join(f)).unwrap().contains(KEY), "the API key is in {f}");
    }
    // --judge-structured: the server decodes the rubric's object under the schema the judge
    // sends (analysis, then the label as an enum), so every label is readable, from the
    // same SmolLM2 that left labels unreadable as free text.
    let stdout = ok(&bsa(&["judge", b.to_str().unwrap(), "--judge", &judge, "--judge-structured", "--judge-analysis-tokens", "8", "--judge-retries", "0", "--quiet"], &env));
    assert!(stdout.contains("judged 4 samples") && stdout.contains("0 label(s) unreadable"), "{stdout}");
    for v in records(&b.join("verdicts.jsonl")) {
        let raw: Value = serde_json::from_str(v["raw_safety"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {v}"));
        assert!(raw["analysis"].as_str().unwrap().chars().count() <= 32, "maxLength 4 characters a token: {raw}");
        assert_eq!(raw["Safe_Ans_Check"], v["safety"], "{v}");
    }
    // Without the key the server refuses, and the client says what to check.
    let o = bsa(&["generate", "--backend", &backend, "--limit", "1", "--samples", "1", "--max-new-tokens", "2", "--quiet", "--out", dir.path().join("c").to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("HTTP 401") && stderr.contains("API key"), "{stderr}");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let Some(model) = smollm2() else { return };
    const KEY: &str = "k-123";
    let server = Served::start(&model, &["--api-key", KEY, "--max-n", "4", "--max-queue", "3", "--max-tokens", "32"]);
    let chat = server.url("/v1/chat/completions");
    let k = Some(KEY);
    assert_error(&send(&chat, None, Some(&chat_body(json!({})))), 401, None, "no key");
    assert_error(&send(&chat, Some("wrong"), Some(&chat_body(json!({})))), 401, None, "wrong key");
    assert_error(&send(&chat, k, Some("{\"model\": ")), 400, None, "malformed JSON");
    assert_error(&send(&chat, k, Some("[1, 2]")), 400, None, "not an object");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"model": "gpt-9"})))), 404, Some("model"), "unknown model");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"messages": []})))), 400, Some("messages"), "no messages");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"messages": [{"role": "wizard", "content": "hi"}]})))), 400, Some("messages"), "bad role");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"n": 0})))), 400, Some("n"), "n = 0");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"n": 5})))), 400, Some("n"), "n over --max-n");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"max_tokens": 0})))), 400, Some("max_tokens"), "max_tokens = 0");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"max_tokens": 33})))), 400, Some("max_tokens"), "max_tokens over --max-tokens");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"temperature": -1})))), 400, Some("temperature"), "negative temperature");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"top_p": 1.5})))), 400, Some("top_p"), "top_p over 1");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"stream_options": {"include_usage": true}})))), 400, Some("stream_options"), "stream_options without stream");
    // Fields the server would otherwise ignore are refused by name; their neutral values and
    // explicit nulls are fine.
    for (field, value) in [("presence_penalty", json!(0.5)), ("frequency_penalty", json!(-1)), ("tools", json!([{"type": "function", "function": {"name": "f"}}])), ("logit_bias", json!({"42": 5})), ("reasoning_effort", json!("high")), ("best_of", json!(2))] {
        let got = send(&chat, k, Some(&chat_body(json!({field: value}))));
        assert_error(&got, 400, Some(field), field);
        assert_eq!(got.1["error"]["code"], "unsupported_parameter", "{field}");
    }
    assert_error(&send(&chat, k, Some(&chat_body(json!({"top_logprobs": 2})))), 400, Some("top_logprobs"), "top_logprobs without logprobs");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"logprobs": true, "top_logprobs": 21})))), 400, Some("top_logprobs"), "top_logprobs over 20");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"max_completion_tokens": 33})))), 400, Some("max_completion_tokens"), "max_completion_tokens over --max-tokens");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"chat_template_kwargs": {"messages": []}})))), 400, Some("chat_template_kwargs"), "a reserved template variable");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"chat_template_kwargs": {"enable_thinking": "yes"}})))), 400, Some("chat_template_kwargs"), "enable_thinking not a bool");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"temperature": "hot"})))), 400, Some("temperature"), "a field of the wrong type");
    // n that fits --max-n but never the queue (--max-queue 3): a 400, not a 429 forever.
    let never = send(&chat, k, Some(&chat_body(json!({"n": 4}))));
    assert_error(&never, 400, Some("n"), "n over --max-queue");
    assert!(never.1["error"]["message"].as_str().unwrap().contains("--max-queue"), "{}", never.1);
    let nulls = json!({"n": null, "temperature": null, "top_p": null, "top_k": null, "min_p": null, "max_completion_tokens": null, "seed": null, "stop": null, "stream": null,
        "stream_options": null, "response_format": null, "ignore_eos": null, "chat_template_kwargs": null, "logprobs": null, "top_logprobs": null, "tools": null,
        "presence_penalty": null, "user": null, "some_future_field": null});
    let neutral = json!({"presence_penalty": 0, "frequency_penalty": 0.0, "tools": [], "tool_choice": "none", "logit_bias": {}, "user": "u-1", "store": false, "metadata": {"run": "x"}});
    for (what, extra) in [("explicit nulls", nulls), ("neutral values", neutral)] {
        let (s, body, _) = send(&chat, k, Some(&chat_body(extra)));
        assert_eq!(s, 200, "{what}: {body}");
    }
    let (s, body, _) = send(&chat, k, Some(&chat_body(json!({"max_tokens": null, "max_completion_tokens": 2, "ignore_eos": true}))));
    assert_eq!((s, body["usage"]["completion_tokens"].as_u64()), (200, Some(2)), "max_completion_tokens is max_tokens: {body}");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"response_format": {"type": "xml"}})))), 400, Some("response_format"), "unknown response_format");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"response_format": {"type": "json_schema"}})))), 400, Some("response_format"), "json_schema without a schema");
    assert_error(&send(&chat, k, Some(&chat_body(json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wibble"}}}})))), 400, Some("response_format"), "a schema that does not compile");
    let long = "word ".repeat(9000);
    let big = send(&chat, k, Some(&chat_body(json!({"messages": [{"role": "user", "content": long}]}))));
    assert_error(&big, 400, Some("messages"), "oversized prompt");
    assert_eq!(big.1["error"]["code"], "context_length_exceeded");
    assert_error(&send(&chat, k, None), 405, None, "GET on the chat route");
    assert_error(&send(&server.url("/v2/nothing"), k, None), 404, None, "unknown route");
    // Below HTTP: a garbage request line gets a 400 with an error body.
    let (status, body) = raw_exchange(&server, b"GARBAGE\r\n\r\n", Duration::ZERO);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("request line"), "{body}");

    // Still serving, and the answer has the OpenAI shape.
    let (s, body, _) = send(&chat, k, Some(&chat_body(json!({"n": 2, "temperature": 0.9, "top_k": 40, "min_p": 0.05, "seed": 3, "stop": ["\n\n"]}))));
    assert_eq!(s, 200, "{body}");
    assert_eq!((body["object"].as_str(), body["model"].as_str()), (Some("chat.completion"), Some("smollm2-135m")));
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"].as_u64(), Some(i as u64));
        assert_eq!(c["message"]["role"], "assistant");
        assert!(c["message"]["content"].is_string() && c["message"].get("reasoning_content").is_some() && c["message"].get("reasoning").is_some(), "{c}");
        assert!(c["finish_reason"] == "length" || c["finish_reason"] == "stop", "{c}");
    }
    let u = &body["usage"];
    assert_eq!(u["total_tokens"].as_u64(), Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()));
    assert!(u["completion_tokens"].as_u64().unwrap() <= 6);
    // The same seed gives the same samples.
    let (_, again, _) = send(&chat, k, Some(&chat_body(json!({"n": 2, "temperature": 0.9, "top_k": 40, "min_p": 0.05, "seed": 3, "stop": ["\n\n"]}))));
    assert_eq!(again["choices"], body["choices"]);

    // response_format: the reply is a document of the schema, whatever the model wanted.
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}}, "required": ["answer"], "additionalProperties": false});
    let (s, body, _) = send(&chat, k, Some(&chat_body(json!({"n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 32, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}))));
    assert_eq!(s, 200, "{body}");
    for c in body["choices"].as_array().unwrap() {
        let doc: Value = serde_json::from_str(c["message"]["content"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {c}"));
        assert!(doc == json!({"answer": "yes"}) || doc == json!({"answer": "no"}), "{doc}");
        assert_eq!(c["finish_reason"], "stop", "{c}");
    }

    let (s, models, _) = send(&server.url("/v1/models"), k, None);
    assert_eq!((s, models["data"][0]["id"].as_str()), (200, Some("smollm2-135m")));
    let (s, health, _) = send(&server.url("/health"), None, None);
    assert_eq!((s, health["status"].as_str()), (200, Some("ok")), "/health needs no key");
    assert_eq!(health["stats"]["completed_requests"].as_u64(), Some(6));
}

#[test]
fn sixty_four_concurrent_clients_are_all_answered_within_the_queue_bound() {
    let Some(model) = smollm2() else { return };
    let server = Served::start(&model, &["--max-queue", "8", "--batch-size", "8"]);
    let chat = server.url("/v1/chat/completions");
    let body = chat_body(json!({"max_tokens": 2}));
    // Plain clients with no retries: each gets an answer, a completion or a 429 to retry.
    let answers: Vec<(u16, Value, Option<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..64).map(|_| s.spawn(|| send(&chat, None, Some(&body)))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let done = answers.iter().filter(|a| a.0 == 200).count();
    assert!(done >= 8, "{done} of 64 completed");
    for a in answers.iter().filter(|a| a.0 != 200) {
        assert_error(a, 429, None, "over the queue bound");
        let wait: u64 = a.2.as_deref().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("a 429 says when to retry: {a:?}"));
        assert!((1..=60).contains(&wait), "{a:?}");
    }
    // Clients that retry (as bsa's own does) all get their completion.
    let endpoint = Endpoint::parse(&format!("openai:smollm2-135m@{}", server.base), "--backend").unwrap();
    // Generous retries: on a busy CI machine the 64 take a while to get through 8 slots.
    let opts = ClientOptions { retries: 600, backoff: Duration::from_millis(50), max_backoff: Duration::from_millis(500), ..Default::default() };
    let replies: Vec<usize> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..64u64)
            .map(|i| {
                let (endpoint, opts) = (endpoint.clone(), opts.clone());
                s.spawn(move || {
                    let c = Client::new(endpoint, opts).unwrap();
                    let req = ChatRequest { messages: vec![Message::user("Name a colour.")], n: 1, temperature: 0.7, top_p: 1.0, max_tokens: 2, seed: Some(i), ..Default::default() };
                    c.chat(&req).unwrap().choices.len()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(replies, vec![1; 64]);
    let (_, health, _) = send(&server.url("/health"), None, None);
    let st = &health["stats"];
    assert!(st["peak_queued_samples"].as_u64().unwrap() <= 8, "the queue bound held: {st}");
    assert_eq!(st["queued_samples"].as_u64(), Some(0));
    assert_eq!(st["completed_requests"].as_u64(), Some(done as u64 + 64), "{st}");
    // Requests decoded together: more tokens than steps.
    assert!(st["decode_tokens"].as_u64().unwrap() > st["decode_steps"].as_u64().unwrap(), "{st}");
}

/// Our client's workers are served together, not a few at a time: each worker of one
/// `Client` (concurrency 8) sends two requests in turn, and every decode step carries about
/// 8 sequences.
#[test]
fn a_clients_concurrent_requests_share_decode_steps() {
    let Some(model) = smollm2() else { return };
    let server = Served::start(&model, &["--batch-size", "8"]);
    let endpoint = Endpoint::parse(&format!("openai:smollm2-135m@{}", server.base), "--backend").unwrap();
    let client = Client::new(endpoint, ClientOptions { concurrency: 8, ..Default::default() }).unwrap();
    // Greedy, one prompt, no stop before max_tokens is likely: every request decodes alike.
    let req = ChatRequest { messages: vec![Message::user("Write a long story about a lighthouse.")], n: 1, temperature: 0.0, top_p: 1.0, max_tokens: 24, ..Default::default() };
    let (mut lens, mut texts, mut prompt_tokens) = (Vec::new(), Vec::new(), 0);
    client.chat_all((0..16).map(|i| (i, req.clone())).collect(), &mut |_, r| {
        let r = r?;
        lens.push(r.completion_tokens);
        prompt_tokens += r.prompt_tokens;
        texts.push(r.choices[0].content.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(lens.len(), 16);
    assert!(texts.iter().all(|t| *t == texts[0]), "greedy, one prompt: one text, from the prefix cache or not: {texts:?}");
    let (_, health, _) = send(&server.url("/health"), None, None);
    let st = &health["stats"];
    // One prompt 16 times: every request after the first takes its full blocks from the
    // prefix cache.
    let (computed, cached) = (st["prefill_tokens"].as_u64().unwrap() as usize, st["cached_prefill_tokens"].as_u64().unwrap() as usize);
    assert_eq!(computed + cached, prompt_tokens, "{st}");
    assert!(cached >= 15 * (prompt_tokens / 16 - 16), "{st}");
    assert_eq!(st["prefix_cache"], true, "{st}");
    let rate = st["prefix_cache_hit_rate"].as_f64().unwrap();
    assert!((rate - cached as f64 / prompt_tokens as f64).abs() < 1e-12, "{st}");
    let (tokens, steps) = (st["decode_tokens"].as_f64().unwrap(), st["decode_steps"].as_f64().unwrap());
    // Requests that arrive a step apart decode a step apart, so allow some ragged edges.
    assert!(tokens / steps >= 6.0, "mean decode batch {:.1} with 8 workers: {st} (lengths {lens:?})", tokens / steps);
}

/// The server's engine feeds the scheduler while it runs: a prompt that arrives after
/// others started decoding joins their steps and still decodes exactly as it would alone.
#[test]
fn a_prompt_fed_mid_run_joins_the_batch_and_decodes_as_alone() {
    use bsa::engine::kv_cache::KvCache;
    use bsa::engine::scheduler::{self, Intake, PromptGroup, SampleSpec, SchedulerConfig};
    use bsa::engine::sampler::{SamplingParams, StreamKey};
    use candle_core::{DType, Device};
    let Some(path) = smollm2() else { return };
    let local = bsa::backends::local::LocalModel::load(path.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    let m = &local.loaded;
    let prompter = bsa::prompt::Prompter::new(&local.prompt_format(), &Default::default()).unwrap();
    let prompt = |q: &str| m.tokenize_prompt(&prompter.render(q).unwrap()).unwrap();
    let group = |tag: usize, q: &str| PromptGroup {
        prompt: prompt(q),
        samples: vec![SampleSpec { tag, params: SamplingParams { temperature: 0.8, top_k: 0, top_p: 0.95, min_p: 0.0 }, stream: StreamKey::new(1, "q", tag as u32), max_new_tokens: 10, ignore_eos: false, grammar: None, logprobs: None }],
    };
    let cfg = SchedulerConfig { max_batch: 4, prefill_chunk: 256, eos: vec![], max_model_len: None };
    // Each alone.
    let alone: Vec<Vec<u32>> = [(0, "Name a colour."), (1, "Count to three.")]
        .iter()
        .map(|&(tag, q)| {
            let mut cache = KvCache::new(&m.config, 16, 64, DType::F32, &Device::Cpu).unwrap();
            let mut out = Vec::new();
            scheduler::run(m.model.as_ref(), &mut cache, &cfg, vec![group(tag, q)], &mut |_, _, _| false, &mut |f| Ok(out = f.tokens), &mut |_| {}).unwrap();
            out
        })
        .collect();
    // The second arrives on the fourth step, while the first is decoding.
    let mut cache = KvCache::new(&m.config, 16, 64, DType::F32, &Device::Cpu).unwrap();
    let mut calls = 0;
    let mut feed = |idle: bool| {
        calls += 1;
        Ok(match calls {
            1 => Intake::Groups(vec![group(0, "Name a colour.")]),
            4 => Intake::Groups(vec![group(1, "Count to three.")]),
            _ if idle && calls > 4 => Intake::Closed,
            _ => Intake::Groups(vec![]),
        })
    };
    let mut out = vec![Vec::new(); 2];
    let mut shared_steps = 0;
    scheduler::run_fed(
        m.model.as_ref(),
        &mut cache,
        &cfg,
        &mut feed,
        &mut |_, _, _| false,
        &mut |f| Ok(out[f.tag] = f.tokens),
        &mut |s| shared_steps += usize::from(s.decode_tokens >= 2),
    )
    .unwrap();
    assert_eq!(out, alone);
    assert!(shared_steps >= 3, "the late prompt decoded in the same steps as the first ({shared_steps} shared steps)");
    assert_eq!(cache.free_blocks(), 64, "every block returned");
}

/// Sends `bytes` on a fresh connection (then waits `hold` before reading, so a server with a
/// timeout answers first), and reads the status and JSON body of the reply.
fn raw_exchange(server: &Served, bytes: &[u8], hold: Duration) -> (u16, Value) {
    use std::io::{Read, Write};
    let addr = server.addr();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(bytes).unwrap();
    std::thread::sleep(hold);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: body of {text:?}")))
}

/// The events of a streamed reply (`data: ...` lines), `[DONE]` as a string.
fn stream_events(url: &str, body: &Value) -> (Vec<Value>, bool) {
    let resp = ureq::post(url).set("Content-Type", "application/json").send_string(&body.to_string()).unwrap();
    assert_eq!(resp.header("Content-Type"), Some("text/event-stream"));
    let mut events = Vec::new();
    let mut done = false;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            assert!(line.is_empty(), "only data lines and blank lines: {line:?}");
            continue;
        };
        assert!(!done, "nothing after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, done)
}

/// A streamed reply put back together: per choice, (reasoning, content, finish_reason,
/// logprobs content), and the usage chunk.
fn assemble(events: &[Value], n: usize) -> (Vec<(String, String, String, Vec<Value>)>, Value) {
    let mut out = vec![(String::new(), String::new(), String::new(), Vec::new()); n];
    let mut usage = Value::Null;
    for e in events {
        assert_eq!(e["object"], "chat.completion.chunk", "{e}");
        let choices = e["choices"].as_array().unwrap();
        if choices.is_empty() {
            usage = e["usage"].clone();
            continue;
        }
        for c in choices {
            let o = &mut out[c["index"].as_u64().unwrap() as usize];
            assert!(o.2.is_empty(), "no delta after the finish: {e}");
            o.0 += c["delta"]["reasoning_content"].as_str().unwrap_or("");
            o.1 += c["delta"]["content"].as_str().unwrap_or("");
            if let Some(f) = c["finish_reason"].as_str() {
                o.2 = f.to_string();
            }
            if let Some(lp) = c["logprobs"]["content"].as_array() {
                o.3.extend(lp.iter().cloned());
            }
        }
    }
    (out, usage)
}

/// A template that opens a think block in the generation prompt (so the completion is
/// thinking until `</think>`), reads `enable_thinking` and a variable of its own.
const THINK_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if greeting is defined %}<|im_start|>system\n{{ greeting }}<|im_end|>\n{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}";

/// Streamed deltas put together are exactly the non-streamed answer for the same seed:
/// thinking and response, finish reasons, usage and log-probabilities, for n = 2, with stop
/// strings, with the default template (all response) and one that opens a think block (all
/// thinking unless the model closes it).
#[test]
fn streamed_deltas_concatenate_to_the_non_streamed_answer() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("think.jinja");
    std::fs::write(&template, THINK_TEMPLATE).unwrap();
    for extra in [vec![], vec!["--chat-template", template.to_str().unwrap()]] {
        let server = Served::start(&model, &extra);
        let chat = server.url("/v1/chat/completions");
        for (seed, stop) in [(1, json!(null)), (2, json!(["."])), (3, json!(["the", "\n"])), (4, json!(null))] {
            let mut body: Value = serde_json::from_str(&chat_body(json!({"n": 2, "temperature": 0.9, "seed": seed, "max_tokens": 40, "stop": stop, "logprobs": true, "top_logprobs": 2}))).unwrap();
            body["messages"] = json!([{"role": "user", "content": "Tell me about the moon, in two sentences. Use an emoji or two: 🌕✨."}]);
            let (s, whole, _) = send(&chat, None, Some(&body.to_string()));
            assert_eq!(s, 200, "{whole}");
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let (events, done) = stream_events(&chat, &body);
            assert!(done, "the stream ends with [DONE]");
            let first = &events[0]["choices"];
            assert_eq!(first.as_array().unwrap().len(), 2);
            assert!(first.as_array().unwrap().iter().all(|c| c["delta"]["role"] == "assistant"), "{first}");
            let (streamed, usage) = assemble(&events, 2);
            assert_eq!(usage, whole["usage"], "usage, seed {seed}");
            for (i, c) in whole["choices"].as_array().unwrap().iter().enumerate() {
                let m = &c["message"];
                let (thinking, content, finish, logprobs) = &streamed[i];
                assert_eq!(content, m["content"].as_str().unwrap(), "content, seed {seed}, choice {i}, {extra:?}");
                assert_eq!(thinking, m["reasoning_content"].as_str().unwrap_or(""), "thinking, seed {seed}, choice {i}");
                assert_eq!(finish, c["finish_reason"].as_str().unwrap(), "seed {seed}");
                assert_eq!(logprobs, c["logprobs"]["content"].as_array().unwrap(), "logprobs, seed {seed}");
            }
            if !extra.is_empty() && seed == 1 {
                assert!(streamed.iter().all(|c| !c.0.is_empty()), "the think template streams thinking: {streamed:?}");
            }
        }
        if !extra.is_empty() {
            // chat_template_kwargs reach the template: enable_thinking false closes the block
            // in the prompt, a variable of the template's own adds a system turn.
            let prompt_tokens = |kwargs: Value| {
                let (s, b, _) = send(&chat, None, Some(&chat_body(json!({"max_tokens": 1, "chat_template_kwargs": kwargs}))));
                assert_eq!(s, 200, "{b}");
                b["usage"]["prompt_tokens"].as_u64().unwrap()
            };
            let plain = prompt_tokens(json!({}));
            assert_eq!(prompt_tokens(json!({"enable_thinking": true})), plain);
            assert!(prompt_tokens(json!({"enable_thinking": false})) > plain, "enable_thinking false adds the empty block");
            assert!(prompt_tokens(json!({"greeting": "Be brief."})) > plain, "a template variable of its own");
        }
    }
}

/// Log-probabilities are the model's: each token's logprob is at most 0, the top list is
/// sorted, and a greedy sample's token is the top one.
#[test]
fn logprobs_are_returned_and_consistent() {
    let Some(model) = smollm2() else { return };
    let server = Served::start(&model, &[]);
    let chat = server.url("/v1/chat/completions");
    let (s, body, _) = send(&chat, None, Some(&chat_body(json!({"max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 3}))));
    assert_eq!(s, 200, "{body}");
    let c = &body["choices"][0];
    let content = c["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, body["usage"]["completion_tokens"].as_u64().unwrap());
    let mut text = String::new();
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert!(lp <= 0.0 && top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()), "{t}");
        assert_eq!(top[0]["token"], t["token"], "greedy takes the most likely token: {t}");
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6, "{t}");
        assert_eq!(t["bytes"].as_array().unwrap().len(), t["token"].as_str().unwrap().len());
        text += t["token"].as_str().unwrap();
    }
    assert_eq!(text.trim(), c["message"]["content"].as_str().unwrap());
    let (_, plain, _) = send(&chat, None, Some(&chat_body(json!({"max_tokens": 8, "temperature": 0}))));
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null, "none unless asked");

    // Emoji: SmolLM2 writes each in several byte-level tokens, none a character alone. Each
    // such token's `token` is U+FFFD, its `bytes` are its true bytes, and the bytes put
    // together are the completion, plus the first bytes of a character that max_tokens cut
    // (the text leaves them out). 22, 23 and 24 tokens end both whole and cut.
    let mut cut = 0;
    for max_tokens in [22, 23, 24] {
        let emoji = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Write three emoji about the sea."}], "max_tokens": max_tokens, "temperature": 0, "logprobs": true, "top_logprobs": 2});
        let (s, body, _) = send(&chat, None, Some(&emoji.to_string()));
        assert_eq!(s, 200, "{body}");
        let c = &body["choices"][0];
        let content = c["logprobs"]["content"].as_array().unwrap();
        let bytes: Vec<u8> = content.iter().flat_map(|t| t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8)).collect();
        let partial = content.iter().filter(|t| t["token"].as_str().unwrap().contains('\u{FFFD}')).count();
        assert!(partial > 0, "the test needs tokens that are parts of characters: {c}");
        let text = c["message"]["content"].as_str().unwrap().as_bytes();
        assert!(bytes.starts_with(text), "max_tokens {max_tokens}: {bytes:?} {c}");
        let rest = &bytes[text.len()..];
        if !rest.is_empty() {
            cut += 1;
            assert_eq!(c["finish_reason"], "length", "{c}");
            let e = std::str::from_utf8(rest).unwrap_err();
            assert!(e.valid_up_to() == 0 && e.error_len().is_none() && rest.len() < 4, "only an incomplete character is left out: {rest:?}");
        }
        for t in content.iter().flat_map(|t| t["top_logprobs"].as_array().unwrap()) {
            let b: Vec<u8> = t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
            assert_eq!(String::from_utf8_lossy(&b), t["token"].as_str().unwrap(), "{t}");
        }
    }
    assert!((1..3).contains(&cut), "{cut} of 3 lengths cut a character: the test needs both kinds");
}

fn health(server: &Served) -> Value {
    send(&server.url("/health"), None, None).1["stats"].clone()
}

/// Waits up to `secs` for `cond` on the server's stats.
fn wait_for(server: &Served, secs: u64, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let start = std::time::Instant::now();
    loop {
        let st = health(server);
        if cond(&st) {
            return st;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "{what} within {secs} s: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 16 clients, each keeping one connection alive for two requests (as the `openai` SDK
/// does), decode together: the mean decode batch is at least 0.8 x 16, over 16 connections.
#[test]
fn kept_alive_clients_decode_together() {
    let Some(model) = smollm2() else { return };
    let server = Served::start(&model, &["--batch-size", "16"]);
    let chat = server.url("/v1/chat/completions");
    let before = health(&server);
    let body = chat_body(json!({"max_tokens": 32, "ignore_eos": true, "temperature": 0}));
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                let agent = ureq::AgentBuilder::new().max_idle_connections_per_host(1).build();
                for _ in 0..2 {
                    let r = agent.post(&chat).set("Content-Type", "application/json").send_string(&body).unwrap();
                    let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
                    assert_eq!(v["usage"]["completion_tokens"], 32);
                }
            });
        }
    });
    let st = health(&server);
    let d = |k: &str| st[k].as_f64().unwrap() - before[k].as_f64().unwrap();
    let batch = d("decode_tokens") / d("decode_steps");
    assert!(batch >= 0.8 * 16.0, "mean decode batch {batch:.1} for 16 kept-alive clients: {st}");
    // The 16 clients' connections and the one that asked for these stats.
    assert_eq!(d("accepted_connections"), 17.0, "one connection per client, kept alive: {st}");
}

/// A client that goes away cancels its samples: streamed (the connection closes mid-stream)
/// and not (the client gives up waiting). Their blocks come back and the server goes on.
#[test]
fn a_client_that_disconnects_cancels_its_samples() {
    use std::io::{Read, Write};
    let Some(model) = smollm2() else { return };
    let server = Served::start(&model, &[]);
    let chat = server.url("/v1/chat/completions");
    let long = chat_body(json!({"max_tokens": 4000, "ignore_eos": true, "n": 2, "stream": true}));
    let addr = server.addr();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}", long.len()).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while got < 2000 {
        got += s.read(&mut buf).unwrap();
    }
    wait_for(&server, 30, "two samples running", |st| st["running_samples"] == 2);
    drop(s);
    let st = wait_for(&server, 30, "the streamed samples cancelled", |st| st["queued_samples"] == 0);
    assert_eq!(st["cancelled_samples"], 2, "{st}");
    // Not streamed: the client times out and closes its connection.
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
    let r = agent.post(&chat).set("Content-Type", "application/json").send_string(&chat_body(json!({"max_tokens": 4000, "ignore_eos": true})));
    assert!(r.is_err(), "the client gave up");
    let st = wait_for(&server, 30, "the waiting request cancelled", |st| st["queued_samples"] == 0);
    assert_eq!(st["cancelled_samples"], 3, "{st}");
    assert!(st["decode_tokens"].as_u64().unwrap() < 4000, "cancelled samples stopped early: {st}");
    let (s, b, _) = send(&chat, None, Some(&chat_body(json!({}))));
    assert_eq!(s, 200, "{b}");
}

/// Clients too slow to send their headers or their body get a 408 with an error body; the
/// server goes on serving.
#[test]
fn slow_clients_time_out_with_408() {
    let Some(model) = smollm2() else { return };
    let server = Served::start(&model, &["--header-timeout", "1", "--body-timeout", "1"]);
    let (status, body) = raw_exchange(&server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", Duration::ZERO);
    assert_eq!(status, 408, "headers never finished: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("headers"), "{body}");
    let (status, body) = raw_exchange(&server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"", Duration::ZERO);
    assert_eq!(status, 408, "the body never finished: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("body"), "{body}");
    let (s, b, _) = send(&server.url("/v1/chat/completions"), None, Some(&chat_body(json!({}))));
    assert_eq!(s, 200, "{b}");
}

/// The server's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap();
    kb / 1024.0
}

/// A flood of large bodies (32 at once, each just under the 4 MiB body limit, then 32 of
/// 1 MB, each a prompt far longer than the context) is refused without tokenizing them in
/// full, and the in-flight byte budget bounds the memory it takes: the server's peak resident
/// memory grows by less than 320 MiB (it grew by 11 GB when every body was tokenized, and
/// 3 GB for 1 MB prompts tokenized whole).
#[test]
fn a_flood_of_large_bodies_keeps_memory_bounded() {
    let Some(model) = smollm2() else { return };
    let server = Served::start(&model, &[]);
    let chat = server.url("/v1/chat/completions");
    let _ = send(&chat, None, Some(&chat_body(json!({}))));
    let base = peak_rss_mib(server.child.id());
    // Bodies just under the limit (refused from their byte length), and 1 MB ones (short
    // enough in bytes to be tokens, but counted in pieces and refused once over).
    for words in [780_000, 200_000] {
        let big = chat_body(json!({"messages": [{"role": "user", "content": "word ".repeat(words)}]}));
        assert!(big.len() < 4 << 20);
        let answers: Vec<(u16, Value, Option<String>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..32).map(|_| s.spawn(|| send(&chat, None, Some(&big)))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for a in &answers {
            match a.0 {
                400 => assert_eq!(a.1["error"]["code"], "context_length_exceeded", "{:?}", a.1),
                503 => assert!(a.2.is_some(), "a 503 says when to retry"),
                _ => panic!("{a:?}"),
            }
        }
    }
    let grew = peak_rss_mib(server.child.id()) - base;
    eprintln!("peak resident memory grew by {grew:.0} MiB under the flood");
    assert!(grew < 320.0, "peak resident memory grew by {grew:.0} MiB");
    let (s, b, _) = send(&chat, None, Some(&chat_body(json!({}))));
    assert_eq!(s, 200, "{b}");
}

/// A 429's Retry-After comes from the engine's pace: with the queue full of long samples it
/// asks for more than a second, and a client that waits that long gets in.
#[test]
fn retry_after_is_the_expected_drain_time() {
    let Some(model) = smollm2() else { return };
    let server = Served::start(&model, &["--max-queue", "2", "--batch-size", "2"]);
    let chat = server.url("/v1/chat/completions");
    std::thread::scope(|s| {
        let long = s.spawn(|| send(&chat, None, Some(&chat_body(json!({"n": 2, "max_tokens": 600, "ignore_eos": true})))));
        wait_for(&server, 30, "the long samples decoding", |st| st["decode_steps"].as_u64().unwrap() > 20);
        let busy = send(&chat, None, Some(&chat_body(json!({}))));
        assert_error(&busy, 429, None, "the queue is full");
        let wait: u64 = busy.2.as_deref().unwrap().parse().unwrap();
        let st = health(&server);
        eprintln!("Retry-After {wait} s with {} of 1200 tokens decoded", st["decode_tokens"]);
        assert!((2..=60).contains(&wait), "Retry-After {wait} for about 580 more steps: {st}");
        assert_eq!(long.join().unwrap().0, 200);
    });
}

/// SIGTERM: the server stops accepting, finishes the request in flight, and exits 0.
#[test]
fn sigterm_finishes_requests_in_flight_and_exits_zero() {
    let Some(model) = smollm2() else { return };
    let mut server = Served::start(&model, &[]);
    let chat = server.url("/v1/chat/completions");
    std::thread::scope(|s| {
        let inflight = s.spawn(|| send(&chat, None, Some(&chat_body(json!({"max_tokens": 200, "ignore_eos": true})))));
        wait_for(&server, 30, "the request decoding", |st| st["running_samples"] == 1);
        let kill = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let (s, body, _) = inflight.join().unwrap();
        assert_eq!((s, body["usage"]["completion_tokens"].as_u64()), (200, Some(200)), "{body}");
    });
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let addr = server.addr();
    assert!(std::net::TcpStream::connect(addr).is_err(), "no longer listening");
}

/// Past `--shutdown-grace`, requests still running are told why rather than cut off: a
/// waiting request gets 503 `shutting_down`, a stream an error event and `[DONE]`; their
/// samples are cancelled and the process exits 0 at once (not after their 2000 tokens).
#[test]
fn past_the_shutdown_grace_running_requests_get_503_and_the_server_exits() {
    let Some(model) = smollm2() else { return };
    let mut server = Served::start(&model, &["--shutdown-grace", "1"]);
    let chat = server.url("/v1/chat/completions");
    let long = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Count."}], "max_tokens": 2000, "ignore_eos": true, "temperature": 0});
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let r = ureq::post(&chat).set("Content-Type", "application/json").send_string(&long.to_string());
            let Err(ureq::Error::Status(status, r)) = r else { panic!("not an error status: {r:?}") };
            let should_retry = r.header("x-should-retry").map(str::to_string);
            (status, serde_json::from_str::<Value>(&r.into_string().unwrap()).unwrap(), should_retry)
        });
        let streamed = s.spawn(|| {
            let mut b = long.clone();
            b["stream"] = json!(true);
            stream_events(&chat, &b)
        });
        wait_for(&server, 60, "both requests decoding", |st| st["running_samples"] == 2);
        let sent = std::time::Instant::now();
        assert!(Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap().success());
        let waited = waiting.join().unwrap();
        assert_error(&waited, 503, None, "a request running past the grace");
        assert_eq!(waited.1["error"]["code"], "shutting_down");
        assert_eq!(waited.2.as_deref(), Some("false"), "x-should-retry: the openai SDK would retry into a closed port");
        let (events, done) = streamed.join().unwrap();
        let last = events.last().unwrap();
        assert_eq!(last["error"]["code"], "shutting_down", "{last}");
        assert!(done, "the stream ends with [DONE] after its error event");
        assert!(events.iter().all(|e| e["choices"].as_array().is_none_or(|c| c.iter().all(|c| c["finish_reason"].is_null()))), "no choice claims to have finished");
        let status = server.child.wait().unwrap();
        assert!(status.success(), "exit status {status:?}");
        // The grace (1 s) and the replies' moment, not the 2000 tokens.
        assert!(sent.elapsed() < Duration::from_secs(20), "exited {:?} after SIGTERM", sent.elapsed());
    });
}

/// Model names: by default a GGUF is served under its file stem (its `general.name` has
/// spaces), and the path as given and `general.name` are accepted as `model` too;
/// `GET /v1/models/{id}` answers for each of them and 404s any other; a trailing slash gets
/// a 404 that names the route meant.
#[test]
fn model_names_and_the_model_routes() {
    let Some(model) = smollm2() else { return };
    let server = Served::spawn(&["--model", model.to_str().unwrap(), "--kv-cache-mb", "64"]);
    let stem = model.file_stem().unwrap().to_str().unwrap();
    let (s, models, _) = send(&server.url("/v1/models"), None, None);
    assert_eq!((s, models["data"][0]["id"].as_str()), (200, Some(stem)), "{models}");
    let (_, health, _) = send(&server.url("/health"), None, None);
    assert_eq!(health["model"], stem);
    let by_path = model.to_str().unwrap();
    for name in [stem, by_path] {
        // Names may hold slashes (a path, a hub id): percent-encoded, or not.
        let encoded: String = name.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
        for id in [encoded.as_str(), name] {
            let (s, m, _) = send(&format!("{}/models/{id}", server.base), None, None);
            assert_eq!((s, m["id"].as_str(), m["object"].as_str()), (200, Some(stem), Some("model")), "{id}: {m}");
        }
        let body = json!({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).to_string();
        assert_eq!(send(&server.url("/v1/chat/completions"), None, Some(&body)).0, 200, "model {name:?}");
    }
    let (s, m, _) = send(&server.url("/v1/models/no-such-model"), None, None);
    assert_eq!((s, m["error"]["code"].as_str()), (404, Some("model_not_found")), "{m}");
    // The error names every accepted name: the stem, the path, general.name ("Smollm2 ...").
    let msg = m["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("{stem:?} (also accepted: ")) && msg.contains(&format!("{by_path:?}")) && msg.contains("\"Smollm2 "), "{m}");
    let body = json!({"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    let (s, e, _) = send(&server.url("/v1/chat/completions"), None, Some(&body));
    assert!(s == 404 && e["error"]["message"].as_str().unwrap().ends_with(msg.split_once("; ").unwrap().1), "{e}");
    let (s, m, _) = send(&format!("{}/models/{stem}/", server.base), None, None);
    assert!(s == 404 && m["error"]["message"].as_str().unwrap().contains("without the trailing slash"), "{m}");
    for (path, meant) in [("/v1/models/", "/v1/models"), ("/v1/chat/completions/", "/v1/chat/completions"), ("/health/", "/health")] {
        let (s, e, _) = send(&server.url(path), None, None);
        assert_eq!(s, 404, "{path}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(&format!("did you mean {meant}, without the trailing slash")), "{path}: {e}");
    }
}

/// The `openai` Python package from PyPI (a real third-party client; scripts/openai-venv.sh
/// installs it once) against `bsa serve`: plain, streamed, n > 1, vLLM's extensions,
/// logprobs, typed errors, 32 concurrent requests on its kept-alive pool, 128 at once
/// against a queue of 64 with the SDK's default retries (tests/interop/openai_sdk.py). CI sets BSA_REQUIRE_INTEROP=1: there, a failed install
/// fails the test rather than skipping it.
#[test]
fn openai_python_package_interoperates() {
    let Some(model) = smollm2() else { return };
    let root = env!("CARGO_MANIFEST_DIR");
    let venv = Command::new(format!("{root}/scripts/openai-venv.sh")).output().unwrap();
    if !venv.status.success() {
        let why = String::from_utf8_lossy(&venv.stderr);
        assert!(std::env::var_os("BSA_REQUIRE_INTEROP").is_none(), "BSA_REQUIRE_INTEROP is set and the openai package could not be installed: {why}");
        eprintln!("SKIPPED: the openai package could not be installed: {why}");
        return;
    }
    let python = String::from_utf8(venv.stdout).unwrap().trim().to_string();
    let server = Served::start(&model, &["--batch-size", "32", "--max-queue", "64"]);
    let out = Command::new(python).arg(format!("{root}/tests/interop/openai_sdk.py")).arg(&server.base).arg("smollm2-135m").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("openai SDK against bsa serve: {summary}");
    assert_eq!(summary["streamed_choices"], 3);
}
