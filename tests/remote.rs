//! The OpenAI-compatible client against a misbehaving server on 127.0.0.1 (a plain
//! TcpListener in this file that answers from a script): 429s with Retry-After, 5xx,
//! garbage bodies, hangs and refused connections are retried and then reported clearly;
//! other 4xx fail at once; `bsa generate --backend openai:` and `bsa judge --judge openai:`
//! write the usual records, keep what they wrote when the server fails, resume, and never
//! write the API key anywhere.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bsa::backends::openai::{ChatRequest, Client, ClientOptions, Endpoint, MaxTokensField};
use bsa::prompt::Message;
use serde_json::Value;

/// A request as the fault server saw it.
#[derive(Clone, Debug)]
struct Seen {
    /// The request line and headers, as sent.
    head: String,
    body: String,
    at: Instant,
}

enum Reply {
    Status(u16, String, Vec<(&'static str, &'static str)>),
    /// Wait this long, then close without answering.
    Hang(Duration),
    /// A 200 of type text/event-stream whose body is written in these pieces, each sent on
    /// its own after a pause (so each reaches the client in a read of its own). Chunked: each
    /// piece one HTTP chunk; else the body ends when the connection closes.
    /// After the pieces, `stall` (when set) waits that long and closes without ending the body.
    Events { pieces: Vec<Vec<u8>>, chunked: bool, stall: Option<Duration> },
}

struct FaultServer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
}

impl FaultServer {
    /// A server that answers one request per connection, with `Connection: close`.
    fn start(script: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> FaultServer {
        FaultServer::listen(false, script)
    }

    /// A server that keeps connections alive: it serves requests on a connection until the
    /// client closes it (a hang, or a body that ends with the connection, closes it).
    fn keep_alive(script: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> FaultServer {
        FaultServer::listen(true, script)
    }

    fn listen(keep_alive: bool, script: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let (log, script, count, accepted) = (seen.clone(), Arc::new(script), Arc::new(AtomicUsize::new(0)), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (log, script, count) = (log.clone(), script.clone(), count.clone());
                std::thread::spawn(move || serve_connection(stream.unwrap(), keep_alive, &log, &*script, &count));
            }
        });
        FaultServer { url, seen, connections }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn serve_connection(stream: TcpStream, keep_alive: bool, log: &Mutex<Vec<Seen>>, script: &(dyn Fn(usize, &Seen) -> Reply + Send + Sync), count: &AtomicUsize) {
    stream.set_nodelay(true).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let len = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let seen = Seen { head, body: String::from_utf8(body).unwrap(), at: Instant::now() };
        log.lock().unwrap().push(seen.clone());
        let close = if keep_alive { "" } else { "Connection: close\r\n" };
        match script(count.fetch_add(1, Ordering::SeqCst), &seen) {
            Reply::Hang(d) => return std::thread::sleep(d),
            Reply::Status(code, body, headers) => {
                let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
                let _ = write!(stream, "HTTP/1.1 {code} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{close}{extra}\r\n{body}", body.len());
            }
            Reply::Events { pieces, chunked, stall } => {
                let framing = if chunked { format!("Transfer-Encoding: chunked\r\n{close}") } else { "Connection: close\r\n".into() };
                let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n{framing}\r\n");
                for p in &pieces {
                    let _ = stream.flush();
                    std::thread::sleep(Duration::from_millis(30));
                    let _ = if chunked { write!(stream, "{:x}\r\n", p.len()).and_then(|_| stream.write_all(p)).and_then(|_| stream.write_all(b"\r\n")) } else { stream.write_all(p) };
                }
                if let Some(d) = stall {
                    let _ = stream.flush();
                    return std::thread::sleep(d);
                }
                if !chunked {
                    return;
                }
                let _ = stream.write_all(b"0\r\n\r\n");
            }
        }
        if !keep_alive {
            return;
        }
    }
}

/// A chat completion body with one choice.
fn completion(content: &str, reasoning: Option<&str>) -> String {
    serde_json::json!({
        "id": "x", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "reasoning_content": reasoning}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    })
    .to_string()
}

fn ok(content: &str) -> Reply {
    Reply::Status(200, completion(content, None), vec![])
}

fn client(url: &str, retries: u32, timeout: Duration) -> Client {
    client_with(url, ClientOptions { retries, timeout, ..test_options() })
}

/// Short backoffs, two workers.
fn test_options() -> ClientOptions {
    ClientOptions { retries: 2, timeout: Duration::from_secs(5), backoff: Duration::from_millis(20), max_backoff: Duration::from_millis(200), concurrency: 2, ..Default::default() }
}

fn client_with(url: &str, opts: ClientOptions) -> Client {
    Client::new(Endpoint::parse(&format!("openai:fake@{url}"), "--backend").unwrap(), opts).unwrap()
}

fn hello() -> ChatRequest {
    ChatRequest { messages: vec![Message::user("hello")], n: 1, temperature: 0.0, top_p: 1.0, max_tokens: 4, ..Default::default() }
}

#[test]
fn a_429_is_retried_after_the_servers_retry_after() {
    let s = FaultServer::start(|i, _| if i == 0 { Reply::Status(429, r#"{"error":{"message":"slow down"}}"#.into(), vec![("Retry-After", "1")]) } else { ok("fine") });
    let reply = client(&s.url, 3, Duration::from_secs(5)).chat(&hello()).unwrap();
    assert_eq!(reply.choices[0].content, "fine");
    let seen = s.seen();
    assert_eq!(seen.len(), 2);
    // The backoff here is 20 ms; the one-second wait can only come from Retry-After.
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}, before the server's Retry-After");
    let body: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!((body["model"].as_str(), body["max_tokens"].as_u64(), body["n"].as_u64()), (Some("fake"), Some(4), Some(1)));
}

#[test]
fn server_errors_and_garbage_are_retried_until_a_good_reply() {
    let s = FaultServer::start(|i, _| match i {
        0 => Reply::Status(500, "internal".into(), vec![]),
        1 => Reply::Status(200, "<html>proxy error</html>".into(), vec![]),
        2 => Reply::Status(503, r#"{"error":{"message":"loading"}}"#.into(), vec![]),
        3 => Reply::Status(200, r#"{"choices": "#.into(), vec![]),
        _ => ok("at last"),
    });
    let reply = client(&s.url, 5, Duration::from_secs(5)).chat(&hello()).unwrap();
    assert_eq!(reply.choices[0].content, "at last");
    assert_eq!(s.seen().len(), 5);
}

#[test]
fn persistent_failures_are_reported_with_the_url_the_status_and_the_attempts() {
    let s = FaultServer::start(|_, _| Reply::Status(502, r#"{"error":{"message":"bad gateway upstream"}}"#.into(), vec![]));
    let err = client(&s.url, 2, Duration::from_secs(5)).chat(&hello()).unwrap_err().to_string();
    assert!(err.contains(&s.url) && err.contains("HTTP 502") && err.contains("bad gateway upstream") && err.contains("after 3 attempts"), "{err}");
    assert_eq!(s.seen().len(), 3);

    let g = FaultServer::start(|_, _| Reply::Status(200, "not json at all".into(), vec![]));
    let err = client(&g.url, 1, Duration::from_secs(5)).chat(&hello()).unwrap_err().to_string();
    assert!(err.contains("not a chat completion") && err.contains("not json at all"), "{err}");
}

#[test]
fn a_hung_request_times_out_and_is_retried() {
    let s = FaultServer::start(|i, _| if i == 0 { Reply::Hang(Duration::from_secs(3)) } else { ok("after the hang") });
    let t = Instant::now();
    let reply = client(&s.url, 2, Duration::from_millis(500)).chat(&hello()).unwrap();
    assert_eq!(reply.choices[0].content, "after the hang");
    assert!(t.elapsed() < Duration::from_secs(3), "the timeout did not cut the hung request");
    assert_eq!(s.seen().len(), 2);
}

#[test]
fn a_client_error_fails_at_once_with_the_servers_message() {
    let s = FaultServer::start(|_, _| Reply::Status(400, r#"{"error":{"message":"n must be at most 4","type":"invalid_request_error","param":"n","code":null}}"#.into(), vec![]));
    let err = client(&s.url, 5, Duration::from_secs(5)).chat(&hello()).unwrap_err().to_string();
    assert!(err.contains("HTTP 400: n must be at most 4"), "{err}");
    assert_eq!(s.seen().len(), 1, "a 400 is not retried");
}

#[test]
fn a_refused_connection_is_retried_then_reported() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let t = Instant::now();
    let err = client(&url, 2, Duration::from_secs(2)).chat(&hello()).unwrap_err().to_string();
    assert!(err.contains(&url) && err.contains("after 3 attempts"), "{err}");
    assert_eq!(err.matches(&url).count(), 1, "the URL once: {err}");
    assert!(t.elapsed() >= Duration::from_millis(20), "no backoff between attempts");
}

fn bsa(args: &[&str], key: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bsa"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BSA_TEST_REMOTE_KEY", key)
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap()
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every file under `dir`, as text.
fn all_text(dir: &Path) -> String {
    std::fs::read_dir(dir).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default()).collect()
}

#[test]
fn generate_and_judge_through_a_server_keep_records_resume_and_never_write_the_key() {
    const KEY: &str = "sk-test-do-not-write-7f3a";
    // Generation: two replies (two reasoning dialects), then a refusal that stops the run.
    let refuse_after = Arc::new(AtomicUsize::new(2));
    let gate = refuse_after.clone();
    let s = FaultServer::start(move |i, _| {
        if i >= gate.load(Ordering::SeqCst) {
            return Reply::Status(400, r#"{"error":{"message":"quota exhausted"}}"#.into(), vec![]);
        }
        if i % 2 == 0 {
            Reply::Status(200, completion("I will not help with that.", Some("The user may get hurt.")), vec![])
        } else {
            ok("The user may get hurt.\n</think>\n\nI will not help with that.")
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let backend = format!("openai:fake-model@{}", s.url);
    let args = ["generate", "--backend", &backend, "--api-key-env", "BSA_TEST_REMOTE_KEY", "--concurrency", "1", "--http-retries", "0",
        "--scenario", "RO", "--limit", "2", "--samples", "2", "--temperature", "0.6", "--max-new-tokens", "16", "--quiet", "--out", out.to_str().unwrap()];
    let o = bsa(&args, KEY);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("quota exhausted") && stderr.contains("2 samples were written and are kept") && stderr.contains("same command again"), "{stderr}");
    let recs = records(&out.join("samples.jsonl"));
    assert_eq!(recs.len(), 2, "the replies before the failure are kept");
    for r in &recs {
        assert_eq!((r["thinking"].as_str(), r["response"].as_str()), (Some("The user may get hurt."), Some("I will not help with that.")), "{r}");
        assert_eq!((r["prompt_tokens"].as_u64(), r["completion_tokens"].as_u64(), r["finish_reason"].as_str()), (Some(11), Some(7), Some("stop")));
    }
    // The key went in the header and nowhere else.
    let seen = s.seen();
    assert!(seen.iter().all(|r| r.head.contains(&format!("Bearer {KEY}"))));
    let body: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(body["temperature"].as_f64(), Some(0.6));
    assert!(body["seed"].is_u64(), "each sample sends its own seed: {body}");
    let seeds: std::collections::HashSet<u64> = seen.iter().map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds.len(), seen.len(), "distinct samples get distinct seeds");

    // Resume: only the two missing samples are asked for.
    refuse_after.store(usize::MAX, Ordering::SeqCst);
    let before = s.seen().len();
    let o = bsa(&args, KEY);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(s.seen().len() - before, 2);
    let recs = records(&out.join("samples.jsonl"));
    let keys: std::collections::HashSet<(String, u64)> = recs.iter().map(|r| (r["item_id"].as_str().unwrap().to_string(), r["sample_index"].as_u64().unwrap())).collect();
    assert_eq!((recs.len(), keys.len()), (4, 4));

    // The judge: safety needs one repair, thinking never gives a label.
    let j = FaultServer::start(|_, seen| {
        let body: Value = serde_json::from_str(&seen.body).unwrap();
        let msgs = body["messages"].as_array().unwrap();
        let rubric = msgs[0]["content"].as_str().unwrap();
        if rubric.contains("Safe_Ans_Check") {
            if msgs.len() == 1 { ok("I am not sure about this one.") } else { ok("{\"Safe_Ans_Check\": \"Unsafe\"}") }
        } else {
            ok("hmm")
        }
    });
    let judge = format!("openai:fake-judge@{}", j.url);
    let o = bsa(&["judge", out.to_str().unwrap(), "--judge", &judge, "--api-key-env", "BSA_TEST_REMOTE_KEY", "--judge-retries", "1", "--quiet"], KEY);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("judged 4 samples") && stdout.contains("16 judge calls") && stdout.contains("4 label(s) unreadable"), "{stdout}");
    let verdicts = records(&out.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 4);
    for v in &verdicts {
        assert_eq!((v["safety"].as_str(), v["judge"].as_str()), (Some("Unsafe"), Some("fake-judge")), "{v}");
        assert!(v["thinking"].is_null(), "an unreadable label stays unlabelled: {v}");
        assert_eq!(v["raw_thinking"].as_str(), Some("hmm"));
        assert_eq!(v["prompt_sha256"].as_str().unwrap().len(), 64);
    }
    let judge_bodies: Vec<Value> = j.seen().iter().map(|r| serde_json::from_str(&r.body).unwrap()).collect();
    assert!(judge_bodies.iter().all(|b| b["temperature"].as_f64() == Some(0.0) && b["model"] == "fake-judge"));
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(manifest.contains("fake-judge") && manifest.contains(&j.url), "the manifest names the judge endpoint");
    assert!(!all_text(&out).contains(KEY), "the API key was written into the run directory");
    assert!(!String::from_utf8_lossy(&o.stderr).contains(KEY) && !stdout.contains(KEY));
}

#[test]
fn a_missing_key_variable_and_a_bad_backend_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_bsa"))
        .args(["generate", "--backend", "openai:m@http://127.0.0.1:9/v1", "--api-key-env", "BSA_TEST_ABSENT_KEY", "--out", out.to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("BSA_TEST_ABSENT_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("BSA_TEST_ABSENT_KEY") && stderr.contains("not set"), "{stderr}");
    assert!(!out.exists());
    let o = bsa(&["generate", "--backend", "openai:no-url", "--out", out.to_str().unwrap()], "k");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("--backend") && stderr.contains("openai:MODEL@BASE_URL"), "{stderr}");
    assert!(!out.exists());
}

/// A request the server refuses on its own account (400: a content filter) comes back to
/// `chat_all` as a refusal for that request alone; the others are answered. An error that
/// is about the client (401) still ends the call.
#[test]
fn a_refusal_concerns_its_own_request_only() {
    let s = FaultServer::start(|_, seen| {
        if seen.body.contains("filtered") {
            Reply::Status(400, r#"{"error":{"message":"content filter triggered","type":"invalid_request_error"}}"#.into(), vec![])
        } else {
            ok("fine")
        }
    });
    let c = client(&s.url, 3, Duration::from_secs(5));
    let reqs: Vec<(usize, ChatRequest)> = (0..6)
        .map(|i| {
            let text = if i == 2 { "a filtered text" } else { "hello" };
            (i, ChatRequest { messages: vec![Message::user(text)], ..hello() })
        })
        .collect();
    let mut got = std::collections::BTreeMap::new();
    c.chat_all(reqs, &mut |i, r| {
        got.insert(i, r.map(|reply| reply.choices.len()).map_err(|e| (e.status, e.message)));
        Ok(())
    })
    .unwrap();
    assert_eq!(got.len(), 6, "every request answered: {got:?}");
    let (status, message) = got[&2].clone().unwrap_err();
    assert!(status == 400 && message.contains("content filter triggered") && message.contains(&s.url), "{message}");
    assert!(got.iter().filter(|(i, _)| **i != 2).all(|(_, r)| r == &Ok(1)), "{got:?}");
    assert_eq!(s.seen().len(), 6, "a refusal is not retried");

    let s = FaultServer::start(|_, _| Reply::Status(401, r#"{"error":{"message":"bad key"}}"#.into(), vec![]));
    let err = client(&s.url, 3, Duration::from_secs(5)).chat_all(vec![(0, hello()), (1, hello())], &mut |_, _| Ok(())).unwrap_err();
    assert!(err.to_string().contains("HTTP 401"), "{err}");
}

/// `bsa judge` through a server that refuses the safety request of one item: those labels
/// are unreadable with the server's message, every other sample is judged, the run goes on.
#[test]
fn a_judge_request_refused_by_the_server_is_recorded_and_the_rest_go_on() {
    let (_dir, out) = generated_run();
    let first = records(&out.join("samples.jsonl"))[0]["item_id"].as_str().unwrap().to_string();
    let data = bsa::data::Dataset::load(concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample.csv")).unwrap();
    let query = data.items.iter().find(|i| i.id == first).unwrap().query.clone();
    let needle = serde_json::to_string(&query).unwrap();
    let needle = needle[1..needle.len() - 1].to_string();
    let j = FaultServer::start(move |_, seen| {
        let safety = seen.body.contains("Safe_Ans_Check");
        if safety && seen.body.contains(&needle) {
            Reply::Status(400, r#"{"error":{"message":"content filter triggered"}}"#.into(), vec![])
        } else if safety {
            ok("{\"Safe_Ans_Check\": \"Safe\"}")
        } else {
            ok("{\"Thk_Acc_Judge\": true}")
        }
    });
    let judge = format!("openai:fake-judge@{}", j.url);
    let o = bsa(&["judge", out.to_str().unwrap(), "--judge", &judge, "--judge-retries", "2", "--quiet"], "k");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("judged 4 samples") && stdout.contains("2 refused by the judge server"), "{stdout}");
    let verdicts = records(&out.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 4);
    for v in &verdicts {
        assert_eq!(v["thinking"], "True", "{v}");
        if v["item_id"] == first.as_str() {
            assert!(v["safety"].is_null(), "{v}");
            let raw = v["raw_safety"].as_str().unwrap();
            assert!(raw.contains("refused") && raw.contains("content filter triggered"), "{raw}");
        } else {
            assert_eq!(v["safety"], "Safe", "{v}");
        }
    }
    // 4 safety + 4 thinking requests; the 2 refused are not asked again.
    assert_eq!(j.seen().len(), 8);
}

/// `--judge-structured` sends the rubric's object as a strict JSON schema (the analysis
/// first and bounded, then the label as an enum of the rubric's labels) and reads the label
/// the object holds, even when the analysis quotes another verdict; a server that refuses
/// response_format stops the run, saying to drop the flag, with nothing written.
#[test]
fn a_structured_remote_judge_sends_the_schema_and_a_refused_schema_is_explained() {
    let (_dir, out) = generated_run();
    let j = FaultServer::start(|_, seen| {
        let body: Value = serde_json::from_str(&seen.body).unwrap();
        if body["response_format"]["json_schema"]["schema"]["properties"].get("Safe_Ans_Check").is_some() {
            ok(r#"{"analysis": "A careless judge would write {\"Safe_Ans_Check\": \"Safe\"}; it gives steps.", "Safe_Ans_Check": "Unsafe"}"#)
        } else {
            ok(r#"{"analysis": "It names the risk.", "Thk_Acc_Judge": "True"}"#)
        }
    });
    let judge = format!("openai:fake-judge@{}", j.url);
    let o = bsa(&["judge", out.to_str().unwrap(), "--judge", &judge, "--judge-structured", "--judge-analysis-tokens", "50", "--quiet"], "k");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let verdicts = records(&out.join("verdicts.jsonl"));
    assert_eq!(verdicts.len(), 4);
    for v in &verdicts {
        assert_eq!((v["safety"].as_str(), v["thinking"].as_str()), (Some("Unsafe"), Some("True")), "{v}");
    }
    let seen = j.seen();
    assert_eq!(seen.len(), 8, "one call per label, no repairs");
    for s in &seen {
        let body: Value = serde_json::from_str(&s.body).unwrap();
        let f = &body["response_format"];
        assert_eq!((f["type"].as_str(), f["json_schema"]["strict"].as_bool()), (Some("json_schema"), Some(true)), "{f}");
        let schema = &f["json_schema"]["schema"];
        let (key, labels) = if schema["properties"].get("Safe_Ans_Check").is_some() { ("Safe_Ans_Check", json_list(&["Safe", "Unsafe"])) } else { ("Thk_Acc_Judge", json_list(&["True", "False"])) };
        assert_eq!(schema["properties"][key]["enum"], labels, "{schema}");
        assert_eq!(schema["properties"]["analysis"]["maxLength"], 200, "{schema}");
        assert_eq!(schema["required"], json_list(&["analysis", key]), "the analysis comes first: {schema}");
        assert_eq!(schema["additionalProperties"], false);
        assert!(body["max_tokens"].as_u64().unwrap() >= 200, "room for the whole object: {body}");
    }

    // A server without structured output: the run stops at once, saying what to do.
    let (_dir2, out2) = generated_run();
    let r = FaultServer::start(|_, _| Reply::Status(400, r#"{"error":{"message":"response_format json_schema is not supported by this model"}}"#.into(), vec![]));
    let judge = format!("openai:fake-judge@{}", r.url);
    let o = bsa(&["judge", out2.to_str().unwrap(), "--judge", &judge, "--judge-structured", "--quiet"], "k");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("drop --judge-structured") && stderr.contains("not supported by this model"), "{stderr}");
    let v2 = out2.join("verdicts.jsonl");
    assert!(!v2.exists() || records(&v2).is_empty(), "nothing written");
    // That judge wrote no verdict, so it does not hold the run: another judge takes it.
    let judge = format!("openai:fake-judge@{}", j.url);
    let o = bsa(&["judge", out2.to_str().unwrap(), "--judge", &judge, "--judge-structured", "--quiet"], "k");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(records(&v2).len(), 4);
    // With verdicts written, another judge is refused, with advice a judge can follow: a
    // command that exists.
    let o = bsa(&["judge", out2.to_str().unwrap(), "--judge", &judge, "--quiet"], "k");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("job.judge") && stderr.contains(&format!("bsa judge {} --new-run", out2.display())), "{stderr}");
}

fn json_list(items: &[&str]) -> Value {
    Value::from(items.iter().map(|s| Value::from(*s)).collect::<Vec<_>>())
}

/// kill -9 during a remote `bsa judge` loses nothing already answered: the server answers
/// the first sample's two requests and then hangs; the verdict is on disk before the kill,
/// and the rerun asks only for the rest.
#[test]
fn a_killed_remote_judge_keeps_what_was_answered() {
    let (_dir, out) = generated_run();
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let gate = hang.clone();
    let j = FaultServer::start(move |i, seen| {
        if i >= 2 && gate.load(Ordering::SeqCst) {
            return Reply::Hang(Duration::from_secs(60));
        }
        if seen.body.contains("Safe_Ans_Check") { ok("{\"Safe_Ans_Check\": \"Unsafe\"}") } else { ok("{\"Thk_Acc_Judge\": false}") }
    });
    let judge = format!("openai:fake-judge@{}", j.url);
    let args = ["judge", out.to_str().unwrap(), "--judge", &judge, "--concurrency", "1", "--http-retries", "0", "--quiet"];
    let mut child = Command::new(env!("CARGO_BIN_EXE_bsa")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).spawn().unwrap();
    let verdicts = out.join("verdicts.jsonl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&verdicts).map_or(0, |s| s.lines().count()) < 1 {
        assert!(child.try_wait().unwrap().is_none(), "the judge ended early");
        assert!(Instant::now() < deadline, "no verdict while the server hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = std::fs::read_to_string(&verdicts).unwrap();
    assert_eq!(records(&verdicts).len(), 1, "{kept}");
    hang.store(false, Ordering::SeqCst);
    let before = j.seen().len();
    let o = bsa(&args, "k");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read_to_string(&verdicts).unwrap().starts_with(&kept), "a verdict written before the kill changed");
    assert_eq!(records(&verdicts).len(), 4);
    assert_eq!(j.seen().len() - before, 6, "only the three samples not yet judged are asked for");
}

/// A run of 4 samples (2 Risk Omission items x 2) generated through a server that always
/// answers; the directory lives as long as the returned guard.
fn generated_run() -> (tempfile::TempDir, std::path::PathBuf) {
    let g = FaultServer::start(|_, _| Reply::Status(200, completion("I will not help with that.", Some("The user may get hurt.")), vec![]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let backend = format!("openai:fake-model@{}", g.url);
    let o = bsa(&["generate", "--backend", &backend, "--scenario", "RO", "--limit", "2", "--samples", "2", "--max-new-tokens", "16", "--quiet", "--out", out.to_str().unwrap()], "k");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (dir, out)
}

/// `n` requests through `c`, `concurrency` at a time; each reply's first choice's content,
/// in request order.
fn chat_many(c: &Client, n: usize) -> Vec<String> {
    let mut got = vec![String::new(); n];
    c.chat_all((0..n).map(|i| (i, hello())).collect(), &mut |i, r| {
        got[i] = r.expect("answered").choices[0].content.clone();
        Ok(())
    })
    .unwrap();
    got
}

/// A server that keeps connections alive: the workers share a pool of kept-alive
/// connections, one per worker at most (ureq keeps one per host unless told), and no request
/// asks to close.
#[test]
fn kept_alive_connections_are_reused_by_the_workers() {
    let s = FaultServer::keep_alive(|_, _| {
        std::thread::sleep(Duration::from_millis(20));
        ok("fine")
    });
    let c = client_with(&s.url, ClientOptions { concurrency: 4, ..test_options() });
    assert!(chat_many(&c, 24).iter().all(|t| t == "fine"));
    assert_eq!(s.seen().len(), 24, "each request served once");
    assert!((1..=4).contains(&s.connections()), "{} connections for 24 requests from 4 workers", s.connections());
    assert!(s.seen().iter().all(|r| !r.head.to_ascii_lowercase().contains("connection: close")), "a request asked to close its connection");
}

/// A server that answers `Connection: close` every time: every request gets a connection of
/// its own, and none is sent on a connection the server closed (each is served once).
#[test]
fn a_server_that_closes_after_each_reply_gets_a_connection_per_request() {
    let s = FaultServer::start(|_, _| ok("fine"));
    let c = client_with(&s.url, ClientOptions { retries: 0, ..test_options() });
    assert!(chat_many(&c, 8).iter().all(|t| t == "fine"));
    assert_eq!((s.seen().len(), s.connections()), (8, 8));
}

/// OpenAI's answer to `max_tokens` from a reasoning model.
const MAX_TOKENS_UNSUPPORTED: &str = r#"{"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}}"#;

/// A server that refuses `max_tokens` by name and answers `max_completion_tokens`.
fn completion_tokens_only() -> FaultServer {
    FaultServer::keep_alive(|_, seen| {
        let body: Value = serde_json::from_str(&seen.body).unwrap();
        if body.get("max_tokens").is_some() {
            Reply::Status(400, MAX_TOKENS_UNSUPPORTED.into(), vec![])
        } else {
            ok(&format!("limit {}", body["max_completion_tokens"]))
        }
    })
}

/// Under `auto` (the default) a 400 that names `max_tokens` as unsupported sends that
/// request again at once with `max_completion_tokens` (not counted as a retry), and every
/// later request of every worker uses it; `max_tokens` chosen by hand gets the 400 with a
/// hint; a 400 about max_tokens' value is no reason to switch.
#[test]
fn auto_switches_to_max_completion_tokens_when_max_tokens_is_refused() {
    let s = completion_tokens_only();
    let c = client_with(&s.url, ClientOptions { retries: 0, ..test_options() });
    assert_eq!(c.max_tokens_field(), MaxTokensField::MaxTokens);
    assert!(chat_many(&c, 6).iter().all(|t| t == "limit 4"));
    assert_eq!(c.max_tokens_field(), MaxTokensField::MaxCompletionTokens);
    let bodies: Vec<Value> = s.seen().iter().map(|r| serde_json::from_str(&r.body).unwrap()).collect();
    let refused = bodies.iter().filter(|b| b.get("max_tokens").is_some()).count();
    assert!((1..=2).contains(&refused), "{refused} requests sent max_tokens: one per worker at most, before the switch");
    assert_eq!(bodies.len() - refused, 6);
    assert!(bodies.iter().all(|b| b.get("max_tokens").is_some() || b["max_completion_tokens"] == 4), "{bodies:?}");
    // Once switched, later requests never send max_tokens. (Within the first batch a worker
    // that read the field before the switch may still arrive after another worker's resend:
    // the order two workers' requests reach the server in is not the client's to fix.)
    assert!(chat_many(&c, 6).iter().all(|t| t == "limit 4"));
    let later: Vec<Value> = s.seen()[bodies.len()..].iter().map(|r| serde_json::from_str(&r.body).unwrap()).collect();
    assert_eq!(later.len(), 6);
    assert!(later.iter().all(|b| b.get("max_tokens").is_none() && b["max_completion_tokens"] == 4), "{later:?}");

    // Chosen by hand: max_completion_tokens from the first request; max_tokens is refused.
    let s = completion_tokens_only();
    let c = client_with(&s.url, ClientOptions { max_tokens_field: MaxTokensField::MaxCompletionTokens, ..test_options() });
    assert_eq!(c.chat(&hello()).unwrap().choices[0].content, "limit 4");
    assert_eq!(s.seen().len(), 1);
    let c = client_with(&s.url, ClientOptions { max_tokens_field: MaxTokensField::MaxTokens, ..test_options() });
    let err = c.chat(&hello()).unwrap_err().to_string();
    assert!(err.contains("HTTP 400") && err.contains("Unsupported parameter") && err.contains("--max-tokens-field max_completion_tokens"), "{err}");

    // A limit too high is the request's fault, whatever the field's name.
    let s = FaultServer::start(|_, _| Reply::Status(400, r#"{"error": {"message": "max_tokens is too large: 100000. This model supports at most 16384 completion tokens.", "param": "max_tokens", "code": null}}"#.into(), vec![]));
    let c = client(&s.url, 2, Duration::from_secs(5));
    assert!(c.chat(&hello()).unwrap_err().to_string().contains("too large"));
    assert_eq!((s.seen().len(), c.max_tokens_field()), (1, MaxTokensField::MaxTokens));
}

/// A reply whose content is a list of parts: thinking parts (Anthropic's `thinking`,
/// `reasoning`) make the thinking and text parts (`text`, `output_text`) the response, in
/// order; explicit nulls are absent fields. A part of an unknown type fails that sample,
/// naming the type, and the run goes on.
#[test]
fn content_as_a_list_of_parts_is_read_and_an_unknown_part_fails_its_sample() {
    let parts = serde_json::json!({
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "reasoning_content": null, "content": [
            {"type": "thinking", "thinking": "The user may ", "signature": "abc"},
            {"type": "reasoning", "text": "get hurt."},
            {"type": "text", "text": "I will not "},
            {"type": "output_text", "text": "help with that.", "annotations": []},
        ]}}],
        "usage": null,
    })
    .to_string();
    let unknown = serde_json::json!({
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": [
            {"type": "text", "text": "Here is a picture:"}, {"type": "image_url", "image_url": {"url": "data:..."}},
        ]}}],
    })
    .to_string();
    let s = FaultServer::keep_alive(move |i, _| Reply::Status(200, if i == 0 { parts.clone() } else { unknown.clone() }, vec![]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let backend = format!("openai:fake-model@{}", s.url);
    let o = bsa(&["generate", "--backend", &backend, "--concurrency", "1", "--scenario", "RO", "--limit", "2", "--samples", "1", "--max-new-tokens", "16", "--quiet", "--out", out.to_str().unwrap()], "k");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs = records(&out.join("samples.jsonl"));
    assert_eq!(recs.len(), 2);
    assert_eq!((recs[0]["thinking"].as_str(), recs[0]["response"].as_str()), (Some("The user may get hurt."), Some("I will not help with that.")), "{}", recs[0]);
    assert_eq!(recs[0]["finish_reason"], "stop");
    assert_eq!(recs[1]["finish_reason"], "error", "{}", recs[1]);
    let error = recs[1]["error"].as_str().unwrap();
    assert!(error.contains("\"image_url\"") && error.contains("content part 1"), "{error}");
    assert_eq!(s.seen().len(), 2, "a reply with an unknown part is not asked again");
}

/// One server-sent event of a chat completion chunk.
fn chunk(index: u32, delta: Value, finish: Option<&str>) -> String {
    let c = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}], "usage": null});
    format!("data: {c}\n\n")
}

const USAGE: &str = "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// A streamed reply (role, thinking deltas, content deltas, finish, usage, [DONE]) with
/// characters outside ASCII, cut into pieces inside those characters' bytes.
fn thinking_stream(done: bool) -> Vec<Vec<u8>> {
    let mut text = String::from(": keep-alive comment\n\n");
    text += &chunk(0, serde_json::json!({"role": "assistant", "content": ""}), None);
    text += &chunk(0, serde_json::json!({"reasoning_content": "Gefährlich: ", "content": null}), None);
    text += &chunk(0, serde_json::json!({"reasoning_content": "危险."}), None);
    text += &chunk(0, serde_json::json!({"content": "Nein, "}), None);
    text += &chunk(0, serde_json::json!({"content": "danke ✓"}), None);
    text += &chunk(0, serde_json::json!({}), Some("stop"));
    text += USAGE;
    if done {
        text += DONE;
    }
    let bytes = text.into_bytes();
    // Cut one byte into "ä", "危" and "✓" (each of more than one byte).
    let mut cuts: Vec<usize> = ["ä", "危", "✓"].iter().map(|c| text_index(&bytes, c) + 1).collect();
    cuts.push(bytes.len());
    let mut pieces = Vec::new();
    let mut from = 0;
    for c in cuts {
        pieces.push(bytes[from..c].to_vec());
        from = c;
    }
    assert!(pieces.iter().filter(|p| std::str::from_utf8(p).is_err()).count() >= 3, "the pieces cut characters");
    pieces
}

fn text_index(bytes: &[u8], needle: &str) -> usize {
    bytes.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap()
}

/// `stream` asks for events with usage; the events are read whole whether the body is
/// chunked or ends with the connection, with characters cut across reads intact; a chunked
/// stream leaves its connection for the next request; a reply of type text/event-stream to
/// a request that did not ask to stream is read as one.
#[test]
fn a_streamed_reply_is_read_chunked_or_not_with_characters_cut_across_reads() {
    for chunked in [true, false] {
        let s = FaultServer::keep_alive(move |_, _| Reply::Events { pieces: thinking_stream(true), chunked, stall: None });
        let c = client_with(&s.url, ClientOptions { stream: true, concurrency: 1, ..test_options() });
        for _ in 0..2 {
            let reply = c.chat(&hello()).unwrap();
            assert_eq!(reply.choices.len(), 1);
            let ch = &reply.choices[0];
            assert_eq!((ch.reasoning.as_deref(), ch.content.as_str(), ch.finish_reason.as_deref()), (Some("Gefährlich: 危险."), "Nein, danke ✓", Some("stop")), "chunked: {chunked}");
            assert_eq!((reply.prompt_tokens, reply.completion_tokens), (11, 7));
        }
        let body: Value = serde_json::from_str(&s.seen()[0].body).unwrap();
        assert_eq!((body["stream"].as_bool(), body["stream_options"]["include_usage"].as_bool()), (Some(true), Some(true)), "{body}");
        assert_eq!(s.seen().len(), 2, "no retries");
        assert_eq!(s.connections(), if chunked { 1 } else { 2 }, "chunked: {chunked}");
    }
    // Not asked to stream, the server streams anyway.
    let s = FaultServer::start(|_, _| Reply::Events { pieces: thinking_stream(true), chunked: true, stall: None });
    let c = client(&s.url, 0, Duration::from_secs(5));
    assert_eq!(c.chat(&hello()).unwrap().choices[0].content, "Nein, danke ✓");
    let body: Value = serde_json::from_str(&s.seen()[0].body).unwrap();
    assert!(body.get("stream").is_none(), "{body}");
}

/// n = 2: the choices' chunks interleave and are put together by index.
#[test]
fn a_streamed_reply_with_two_choices_is_put_together_by_index() {
    let s = FaultServer::start(|_, _| {
        let mut t = String::new();
        t += &chunk(1, serde_json::json!({"role": "assistant", "reasoning": "second "}), None);
        t += &chunk(0, serde_json::json!({"role": "assistant", "reasoning": "first "}), None);
        t += &chunk(0, serde_json::json!({"content": "A"}), None);
        t += &chunk(1, serde_json::json!({"reasoning": "thought", "content": "B"}), None);
        t += &chunk(1, serde_json::json!({"content": "b"}), Some("length"));
        t += &chunk(0, serde_json::json!({"reasoning": "thought", "content": "a"}), Some("stop"));
        t += USAGE;
        t += DONE;
        Reply::Events { pieces: vec![t.into_bytes()], chunked: true, stall: None }
    });
    let c = client_with(&s.url, ClientOptions { stream: true, ..test_options() });
    let reply = c.chat(&ChatRequest { n: 2, ..hello() }).unwrap();
    let got: Vec<_> = reply.choices.iter().map(|c| (c.reasoning.as_deref(), c.content.as_str(), c.finish_reason.as_deref())).collect();
    assert_eq!(got, [(Some("first thought"), "Aa", Some("stop")), (Some("second thought"), "Bb", Some("length"))]);
}

/// A stream that ends before [DONE], or stalls past the per-attempt timeout, is a failed
/// attempt that is tried again; so is an error event without a client-side code, reported
/// with the server's message when it persists.
#[test]
fn a_broken_stream_is_retried_and_an_error_event_is_reported() {
    let s = FaultServer::start(|i, _| match i {
        0 => Reply::Events { pieces: thinking_stream(false), chunked: false, stall: None },
        1 => Reply::Events { pieces: thinking_stream(false), chunked: true, stall: None },
        2 => Reply::Events { pieces: thinking_stream(false)[..1].to_vec(), chunked: true, stall: Some(Duration::from_secs(3)) },
        _ => Reply::Events { pieces: thinking_stream(true), chunked: true, stall: None },
    });
    let c = client_with(&s.url, ClientOptions { stream: true, retries: 3, timeout: Duration::from_millis(800), ..test_options() });
    let t = Instant::now();
    assert_eq!(c.chat(&hello()).unwrap().choices[0].content, "Nein, danke ✓");
    assert_eq!(s.seen().len(), 4);
    assert!(t.elapsed() < Duration::from_secs(3), "the timeout did not cut the stalled stream");

    let s = FaultServer::start(|_, _| Reply::Events { pieces: thinking_stream(false), chunked: true, stall: None });
    let err = client_with(&s.url, ClientOptions { stream: true, retries: 1, ..test_options() }).chat(&hello()).unwrap_err().to_string();
    assert!(err.contains("before data: [DONE]") && err.contains("after 2 attempts"), "{err}");

    let unfinished = chunk(0, serde_json::json!({"content": "x"}), None) + DONE;
    let s = FaultServer::start(move |_, _| Reply::Events { pieces: vec![unfinished.clone().into_bytes()], chunked: true, stall: None });
    let err = client_with(&s.url, ClientOptions { stream: true, retries: 0, ..test_options() }).chat(&hello()).unwrap_err().to_string();
    assert!(err.contains("without a finish_reason for choice 0"), "{err}");

    let overloaded = chunk(0, serde_json::json!({"content": "x"}), None) + "data: {\"error\": {\"message\": \"the engine is overloaded\", \"type\": \"server_error\"}}\n\n";
    let s = FaultServer::start(move |_, _| Reply::Events { pieces: vec![overloaded.clone().into_bytes()], chunked: true, stall: None });
    let err = client_with(&s.url, ClientOptions { stream: true, retries: 1, ..test_options() }).chat(&hello()).unwrap_err().to_string();
    assert!(err.contains("the engine is overloaded") && err.contains("after 2 attempts"), "{err}");
    assert_eq!(s.seen().len(), 2);
}

/// The flags reach the server: `bsa generate --stream` against a server that streams and
/// refuses max_tokens writes the usual records.
#[test]
fn generate_with_stream_and_the_token_field_flags() {
    let s = FaultServer::keep_alive(|_, seen| {
        let body: Value = serde_json::from_str(&seen.body).unwrap();
        if body.get("max_tokens").is_some() {
            return Reply::Status(400, MAX_TOKENS_UNSUPPORTED.into(), vec![]);
        }
        assert_eq!(body["stream"], true);
        Reply::Events { pieces: thinking_stream(true), chunked: true, stall: None }
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let backend = format!("openai:fake-model@{}", s.url);
    let o = bsa(&["generate", "--backend", &backend, "--stream", "--max-tokens-field", "auto", "--concurrency", "2", "--scenario", "RO", "--limit", "2", "--samples", "2", "--max-new-tokens", "16", "--quiet", "--out", out.to_str().unwrap()], "k");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("sending max_completion_tokens"), "{stderr}");
    let recs = records(&out.join("samples.jsonl"));
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert_eq!((r["thinking"].as_str(), r["response"].as_str(), r["completion_tokens"].as_u64()), (Some("Gefährlich: 危险."), Some("Nein, danke ✓"), Some(7)), "{r}");
    }
    let o = bsa(&["generate", "--backend", &backend, "--max-tokens-field", "max_completion_tokens", "--scenario", "RO", "--limit", "2", "--samples", "2", "--max-new-tokens", "16", "--quiet", "--out", out.to_str().unwrap()], "k");
    assert!(o.status.success(), "client settings are not the job: {}", String::from_utf8_lossy(&o.stderr));
}
