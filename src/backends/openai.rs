//! The OpenAI-compatible client: chat completions from vLLM, SGLang, the llama.cpp server,
//! `bsa serve` or a hosted API, for generation (`--backend openai:MODEL@URL`) and for the
//! judge (`--judge openai:MODEL@URL`).
//!
//! Requests run on a few threads at once (`concurrency`) over kept-alive connections from one
//! pool; a 429, a 5xx, a timeout, a broken connection or a 200 whose body is not a chat
//! completion is tried again after an exponential backoff with jitter (a `Retry-After` from
//! the server wins); any other 4xx is the caller's mistake and fails at once with the
//! server's message. A reply is read whole (JSON) or as server-sent events (`--stream`, or
//! any reply of type `text/event-stream`: [`stream`]). The API key comes from an environment
//! variable and lives only in the `Authorization` header: it is in no error, manifest,
//! record or log line.

mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::preset::{self, Preset};
use super::{Backend, Completion, Progress, PromptSettings, Request};
use crate::prompt::{Message, Placement, SafetyRules, SplitCompletion, ThinkConvention};
use crate::records::FinishReason;

/// `openai:MODEL@BASE_URL`, e.g. `openai:Qwen/QwQ-32B@http://gpu-box:8000/v1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub model: String,
    /// Up to and including the API version, without a trailing slash (`.../v1`).
    pub base_url: String,
}

impl Endpoint {
    /// Parses a backend spec; `flag` names the option in the error.
    pub fn parse(spec: &str, flag: &str) -> Result<Endpoint> {
        let usage = "the form is openai:MODEL@BASE_URL, e.g. openai:my-model@http://127.0.0.1:8000/v1";
        let rest = spec.strip_prefix("openai:").ok_or_else(|| anyhow!("{flag} {spec:?}: {usage}"))?;
        // A hub id holds no '@' but a URL may (user@host), so the model ends at the first '@'.
        let (model, url) = rest.split_once('@').ok_or_else(|| anyhow!("{flag} {spec:?}: no '@BASE_URL'; {usage}"))?;
        if model.is_empty() {
            bail!("{flag} {spec:?}: the model name is empty; {usage}");
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("{flag} {spec:?}: the base URL {url:?} must start with http:// or https://; {usage}");
        }
        Ok(Endpoint { model: model.to_string(), base_url: url.trim_end_matches('/').to_string() })
    }

    pub fn chat_url(&self) -> String {
        format!("{}/chat/completions", self.base_url)
    }
}

/// How the client talks to the server.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientOptions {
    /// The environment variable holding the API key; unset means OPENAI_API_KEY if present.
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Retries of one request after a retryable failure.
    pub retries: u32,
    /// The whole of one attempt (connect, generate, read).
    pub timeout: Duration,
    /// The first backoff; doubled every retry, capped at `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// The name the token limit is sent under.
    pub max_tokens_field: MaxTokensField,
    /// Ask for the reply as server-sent events (`"stream": true`, with usage) and read them.
    pub stream: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            api_key_env: None,
            concurrency: 8,
            retries: 5,
            timeout: Duration::from_secs(600),
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_tokens_field: MaxTokensField::Auto,
            stream: false,
        }
    }
}

/// The name a request gives its token limit (`--max-tokens-field`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaxTokensField {
    /// `max_tokens`: vLLM, SGLang, the llama.cpp server, `bsa serve`, most hosted models.
    MaxTokens,
    /// `max_completion_tokens`: what hosted reasoning models take (they answer 400 to
    /// `max_tokens`).
    MaxCompletionTokens,
    /// `max_tokens` until the server answers 400 naming it as unsupported; then that request
    /// again at once, and every later one of the client, with `max_completion_tokens`.
    #[default]
    Auto,
}

impl MaxTokensField {
    /// `max_tokens`, `max_completion_tokens` or `auto`; the error says which are allowed.
    pub fn parse(s: &str) -> std::result::Result<MaxTokensField, String> {
        match s {
            "max_tokens" => Ok(MaxTokensField::MaxTokens),
            "max_completion_tokens" => Ok(MaxTokensField::MaxCompletionTokens),
            "auto" => Ok(MaxTokensField::Auto),
            _ => Err("must be max_tokens, max_completion_tokens or auto (max_tokens until the server refuses it, then max_completion_tokens)".into()),
        }
    }

    /// The JSON key sent: `auto` sends `max_tokens` (until a client switches).
    pub fn key(self) -> &'static str {
        match self {
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
            MaxTokensField::MaxTokens | MaxTokensField::Auto => "max_tokens",
        }
    }
}

/// One chat completion request (the fields `bsa` uses of the OpenAI protocol).
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub n: u32,
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off (then not sent: hosted APIs refuse the field).
    pub top_k: usize,
    /// 0 = off (then not sent).
    pub min_p: f32,
    pub max_tokens: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Extra top-level fields, e.g. `chat_template_kwargs` for vLLM.
    pub extra: serde_json::Map<String, Value>,
}

impl ChatRequest {
    /// The JSON body for `model`, the limit sent as `max_tokens`, not streamed.
    pub fn body(&self, model: &str) -> Value {
        self.wire_body(model, MaxTokensField::MaxTokens, false)
    }

    /// The JSON body for `model` with the limit under `field`'s key; `stream` asks for
    /// server-sent events with a final usage chunk.
    pub fn wire_body(&self, model: &str, field: MaxTokensField, stream: bool) -> Value {
        let mut b = json!({
            "model": model,
            "messages": self.messages,
            "n": self.n.max(1),
            "temperature": decimal(self.temperature),
            "top_p": decimal(self.top_p),
        });
        let o = b.as_object_mut().expect("an object");
        o.insert(field.key().into(), json!(self.max_tokens));
        if stream {
            o.insert("stream".into(), json!(true));
            o.insert("stream_options".into(), json!({"include_usage": true}));
        }
        if self.top_k > 0 {
            o.insert("top_k".into(), json!(self.top_k));
        }
        if self.min_p > 0.0 {
            o.insert("min_p".into(), json!(decimal(self.min_p)));
        }
        if let Some(s) = self.seed {
            o.insert("seed".into(), json!(s));
        }
        if !self.stop.is_empty() {
            o.insert("stop".into(), json!(self.stop));
        }
        for (k, v) in &self.extra {
            o.insert(k.clone(), v.clone());
        }
        b
    }
}

/// The f32 as the decimal a user wrote (0.6, not 0.6000000238418579).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// One choice of a reply, as the server sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    #[serde(default)]
    pub content: String,
    /// `reasoning_content` (DeepSeek, vLLM) or `reasoning` (newer vLLM, OpenRouter), or the
    /// thinking parts of a content list.
    pub reasoning: Option<String>,
    pub finish_reason: Option<String>,
    /// Why this choice could not be read (a content part of a type bsa does not know); the
    /// sample is then recorded as failed with this message.
    pub error: Option<String>,
}

impl ChatChoice {
    /// Why the server stopped: "length" is the token limit, anything else ended on its own;
    /// a choice that could not be read is an error.
    pub fn finish(&self) -> FinishReason {
        if self.error.is_some() {
            FinishReason::Error
        } else if self.finish_reason.as_deref() == Some("length") {
            FinishReason::Length
        } else {
            FinishReason::Stop
        }
    }

    /// This choice as the [`Completion`] of sample `tag`.
    pub fn into_completion(self, tag: usize, prompt_tokens: usize, completion_tokens: usize) -> Completion {
        let finish = self.finish();
        Completion { tag, text: self.content, reasoning: self.reasoning, finish, prompt_tokens, completion_tokens, refused: None, label_probs: None, error: self.error }
    }

    /// Thinking and response (see [`Completion::split`]).
    pub fn split(&self, think: &ThinkConvention) -> SplitCompletion {
        self.clone().into_completion(0, 0, 0).split(think)
    }

    /// Appends a message's (or a stream delta's) `content`: a string is text; a list of
    /// parts is read in order, thinking parts (`thinking`, `reasoning`) to the reasoning and
    /// text parts (`text`, `output_text`, `refusal`) to the content; null adds nothing. A
    /// part it cannot read (an unknown type, a part without its text) sets `error`, naming
    /// it, rather than being dropped.
    fn add_content(&mut self, content: Option<&Value>) {
        let parts = match content {
            None | Some(Value::Null) => return,
            Some(Value::String(s)) => return self.content.push_str(s),
            Some(Value::Array(parts)) => parts,
            Some(other) => {
                self.error.get_or_insert_with(|| format!("the reply's content is neither a text nor a list of parts: {}", snippet(&other.to_string())));
                return;
            }
        };
        for (i, part) in parts.iter().enumerate() {
            let kind = part.get("type").and_then(Value::as_str);
            // Anthropic and Mistral name the thinking `thinking` (Mistral's a list of text
            // parts); others `reasoning`, or put it in `text`/`summary`.
            let (fields, thinking): (&[&str], bool) = match kind {
                _ if part.is_string() => (&[], false),
                Some("text" | "output_text") => (&["text"], false),
                Some("refusal") => (&["refusal", "text"], false),
                Some("thinking" | "reasoning") => (&["thinking", "reasoning", "text", "summary", "content"], true),
                _ => {
                    let named = kind.map_or_else(|| "no type".to_string(), |k| format!("type {k:?}"));
                    self.error.get_or_insert_with(|| {
                        format!("content part {i} has {named}, which bsa cannot read (it reads text, output_text, refusal, thinking and reasoning parts): {}", snippet(&part.to_string()))
                    });
                    continue;
                }
            };
            let text = if let Some(s) = part.as_str() { Some(s.to_string()) } else { fields.iter().find_map(|f| part.get(*f).and_then(part_text)) };
            match (text, thinking) {
                (Some(t), true) => self.reasoning.get_or_insert_with(String::new).push_str(&t),
                (Some(t), false) => self.content.push_str(&t),
                (None, _) => {
                    self.error.get_or_insert_with(|| format!("content part {i} of type {:?} holds no text: {}", kind.unwrap_or(""), snippet(&part.to_string())));
                }
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatReply {
    pub choices: Vec<ChatChoice>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Reads a chat completion body; None when it is not one. Explicit nulls count as absent.
pub fn parse_reply(body: &str) -> Option<ChatReply> {
    let v: Value = serde_json::from_str(body).ok()?;
    let choices = v.get("choices")?.as_array()?;
    let mut out = Vec::with_capacity(choices.len());
    for c in choices {
        let msg = c.get("message").filter(|m| m.is_object())?;
        let text = |k: &str| msg.get(k).and_then(Value::as_str).map(str::to_string);
        let mut choice = ChatChoice { content: String::new(), reasoning: text("reasoning_content").or_else(|| text("reasoning")), finish_reason: c.get("finish_reason").and_then(Value::as_str).map(str::to_string), error: None };
        choice.add_content(msg.get("content"));
        // OpenAI puts a refusal beside a null content; for a safety benchmark it is the answer.
        if choice.content.is_empty() && choice.error.is_none() {
            choice.content = text("refusal").unwrap_or_default();
        }
        out.push(choice);
    }
    let (prompt_tokens, completion_tokens) = usage(v.get("usage"));
    Some(ChatReply { choices: out, prompt_tokens, completion_tokens })
}

/// Prompt and completion tokens of a `usage` object (0 for what it lacks, or a null).
fn usage(u: Option<&Value>) -> (usize, usize) {
    let n = |k: &str| u.and_then(|u| u.get(k)).and_then(Value::as_u64).unwrap_or(0) as usize;
    (n("prompt_tokens"), n("completion_tokens"))
}

/// The text of a part's field: a string, or a list of strings and `{"text": ...}` parts
/// joined.
fn part_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items.iter().map(|i| i.as_str().or_else(|| i.get("text").and_then(Value::as_str))).collect(),
        _ => None,
    }
}

/// An API key that never prints.
#[derive(Clone)]
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// A client for one endpoint.
#[derive(Debug)]
pub struct Client {
    pub endpoint: Endpoint,
    key: Option<ApiKey>,
    agent: ureq::Agent,
    pub opts: ClientOptions,
    /// Set under [`MaxTokensField::Auto`] once the server has refused `max_tokens`: every
    /// later request of every worker sends `max_completion_tokens`.
    completion_tokens: AtomicBool,
}

/// Why one attempt failed, and whether to try again (after how long, if the server said).
struct Failure {
    message: String,
    retry: bool,
    retry_after: Option<Duration>,
    /// The HTTP status, when the server answered with one (or an error event named one).
    status: Option<u16>,
    /// The server's `error` object, when its body had one.
    error: Option<Value>,
}

impl Failure {
    /// A failure worth another attempt, with no word from the server on when.
    fn retryable(message: String) -> Failure {
        Failure { message, retry: true, retry_after: None, status: None, error: None }
    }
}

/// Whether a server's `error` object refuses `max_tokens` as a parameter (OpenAI's
/// `unsupported_parameter`, or a message saying to use `max_completion_tokens`), rather than
/// refusing its value.
fn refuses_max_tokens(error: &Value) -> bool {
    let field = |k: &str| error.get(k).and_then(Value::as_str).unwrap_or("");
    let message = field("message").to_ascii_lowercase();
    let names_it = field("param") == "max_tokens" || message.contains("max_tokens");
    let unsupported = field("code") == "unsupported_parameter" || ["unsupported", "not supported", "max_completion_tokens"].iter().any(|w| message.contains(w));
    names_it && unsupported
}

/// A server's refusal of one request that says nothing about the others: HTTP 400, 413 or
/// 422 (a content filter on one text, a prompt too long), not retried. [`Client::chat`]
/// fails with it as the error (`downcast_ref`), so a caller may record the refusal for that
/// request and go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// The URL, the status and the server's message.
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

impl Client {
    pub fn new(endpoint: Endpoint, opts: ClientOptions) -> Result<Client> {
        let key = match &opts.api_key_env {
            Some(name) => Some(std::env::var(name).map_err(|_| {
                anyhow!("--api-key-env {name}: the environment variable {name} is not set; export it with the API key (or drop the flag for a server without a key)")
            })?),
            None => std::env::var("OPENAI_API_KEY").ok(),
        };
        if opts.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        // One idle connection per worker kept for reuse (ureq keeps one per host by default,
        // so the other workers would reconnect every time).
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(opts.timeout.min(Duration::from_secs(30)))
            .timeout(opts.timeout)
            .max_idle_connections_per_host(opts.concurrency)
            .max_idle_connections(opts.concurrency.max(100))
            .build();
        let completion_tokens = AtomicBool::new(opts.max_tokens_field == MaxTokensField::MaxCompletionTokens);
        Ok(Client { endpoint, key: key.filter(|k| !k.is_empty()).map(ApiKey), agent, opts, completion_tokens })
    }

    /// The field requests send their token limit under now: `max_tokens` or
    /// `max_completion_tokens`, never `Auto`.
    pub fn max_tokens_field(&self) -> MaxTokensField {
        if self.completion_tokens.load(Ordering::Relaxed) {
            MaxTokensField::MaxCompletionTokens
        } else {
            MaxTokensField::MaxTokens
        }
    }

    /// The endpoint as recorded in a manifest (no key).
    pub fn describe(&self) -> Value {
        json!({"backend": "openai", "model": self.endpoint.model, "base_url": self.endpoint.base_url})
    }

    /// One chat completion, retried as the module doc says.
    pub fn chat(&self, req: &ChatRequest) -> Result<ChatReply> {
        let url = self.endpoint.chat_url();
        let mut attempt = 0;
        loop {
            let field = self.max_tokens_field();
            let body = req.wire_body(&self.endpoint.model, field, self.opts.stream).to_string();
            let mut failure = match self.attempt(&url, &body) {
                Ok(reply) => return Ok(reply),
                Err(f) => f,
            };
            if failure.status == Some(400) && field == MaxTokensField::MaxTokens && failure.error.as_ref().is_some_and(refuses_max_tokens) {
                if self.opts.max_tokens_field == MaxTokensField::Auto {
                    if !self.completion_tokens.swap(true, Ordering::Relaxed) {
                        eprintln!("note: {url} refuses max_tokens; sending max_completion_tokens from now on");
                    }
                    // Not a failed attempt: the same request at once, in the server's terms.
                    continue;
                }
                failure.message.push_str(" (pass --max-tokens-field max_completion_tokens, or auto)");
            }
            if let (false, Some(status @ (400 | 413 | 422))) = (failure.retry, failure.status) {
                return Err(anyhow::Error::new(Refusal { status, message: format!("{url}: {}", failure.message) }));
            }
            if !failure.retry || attempt >= self.opts.retries {
                let tries = if failure.retry { format!(" (after {} attempts)", attempt + 1) } else { String::new() };
                bail!("{url}: {}{tries}", failure.message);
            }
            let wait = failure.retry_after.unwrap_or_else(|| self.backoff(attempt));
            std::thread::sleep(wait);
            attempt += 1;
        }
    }

    /// Full jitter over an exponential ceiling: many clients hit by one 429 do not return
    /// in lockstep.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.opts.backoff.saturating_mul(1u32 << attempt.min(16)).min(self.opts.max_backoff);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn attempt(&self, url: &str, body: &str) -> std::result::Result<ChatReply, Failure> {
        let mut r = self.agent.post(url).set("Content-Type", "application/json");
        if let Some(k) = &self.key {
            r = r.set("Authorization", &format!("Bearer {}", k.0));
        }
        match r.send_string(body) {
            // Some servers stream whether asked to or not: the type says how to read it.
            Ok(resp) if resp.content_type().eq_ignore_ascii_case("text/event-stream") => stream::read(resp.into_reader()),
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| Failure::retryable(format!("reading the reply: {e}")))?;
                parse_reply(&text).ok_or_else(|| Failure {
                    status: Some(200),
                    ..Failure::retryable(format!("the server answered 200 with a body that is not a chat completion: {}", snippet(&text)))
                })
            }
            Err(ureq::Error::Status(code, resp)) => {
                let retry_after = resp.header("Retry-After").and_then(|s| s.trim().parse::<f64>().ok()).filter(|s| s.is_finite() && *s >= 0.0).map(|s| Duration::from_secs_f64(s.min(self.opts.max_backoff.as_secs_f64().max(1.0))));
                let text = resp.into_string().unwrap_or_default();
                let error = serde_json::from_str::<Value>(&text).ok().and_then(|v| v.get("error").cloned());
                let msg = error.as_ref().and_then(|e| e.get("message").and_then(Value::as_str).map(str::to_string)).unwrap_or_else(|| snippet(&text));
                let hint = match code {
                    401 | 403 => " (check the API key: OPENAI_API_KEY or the variable named by --api-key-env)",
                    404 => " (check the model name and the base URL, which usually ends in /v1)",
                    _ => "",
                };
                Err(Failure { message: format!("HTTP {code}: {msg}{hint}"), retry: retryable_status(code), retry_after, status: Some(code), error })
            }
            // ureq's message starts with the URL, which the caller puts first already.
            Err(ureq::Error::Transport(t)) => {
                let text = t.to_string();
                let message = text.strip_prefix(url).map(|m| m.trim_start_matches(':').trim_start().to_string()).unwrap_or(text);
                Err(Failure::retryable(message))
            }
        }
    }

    /// Runs every request, `concurrency` at a time, handing each reply to `on_reply` on the
    /// calling thread as it arrives (so records are appended as they come). After the first
    /// failure no new request starts; those in flight finish and are handed over, then the
    /// failure is returned.
    pub fn chat_all<T: Send>(
        &self,
        requests: Vec<(T, ChatRequest)>,
        on_reply: &mut dyn FnMut(T, std::result::Result<ChatReply, Refusal>) -> Result<()>,
    ) -> Result<()> {
        let queue = Mutex::new(requests.into_iter());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let workers = self.opts.concurrency.max(1);
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<(T, Result<ChatReply>)>();
            for _ in 0..workers {
                let tx = tx.clone();
                let (queue, failed) = (&queue, &failed);
                scope.spawn(move || loop {
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let Some((tag, req)) = queue.lock().unwrap().next() else { break };
                    let r = self.chat(&req);
                    // A refusal concerns its own request only: the others go on.
                    if r.as_ref().is_err_and(|e| e.downcast_ref::<Refusal>().is_none()) {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    if tx.send((tag, r)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            let mut first_err = None;
            let mut caller_failed = false;
            for (tag, r) in rx {
                // Replies (and refusals) that arrive after a failed request are still handed
                // over, until the caller itself fails.
                let handed = match r.map_err(|e| e.downcast::<Refusal>()) {
                    Ok(reply) => Ok(reply),
                    Err(Ok(refusal)) => Err(refusal),
                    Err(Err(e)) => {
                        first_err.get_or_insert(e);
                        continue;
                    }
                };
                if caller_failed {
                    continue;
                }
                if let Err(e) = on_reply(tag, handed) {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    caller_failed = true;
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
    }
}

/// Whether an HTTP status (or an error event's code) is worth another attempt: the server
/// is busy or broken, not the request wrong.
fn retryable_status(code: u16) -> bool {
    matches!(code, 408 | 409 | 429) || code >= 500
}

/// The start of a body, for error messages.
fn snippet(text: &str) -> String {
    let t = text.trim();
    if t.is_empty() {
        return "(empty body)".into();
    }
    let cut: String = t.chars().take(200).collect();
    if cut.len() < t.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

/// The request seed of sample `sample` of `item` under the run's `seed`, in 63 bits
/// (OpenAI's seed is a signed 64-bit integer): FNV-1a 64 of `"{seed}:{item}:{sample}"`, so a
/// server that honours `seed` gives a sample the same text whichever other samples a
/// resumed run still needs.
pub fn request_seed(seed: u64, item: &str, sample: u32) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(format!("{seed}:{item}:{sample}").as_bytes());
    h.finish() >> 1
}

/// Completions from an OpenAI-compatible server: one request per sample (`n = 1`, its own
/// `seed`), `concurrency` in flight, replies handed over as they arrive.
pub struct OpenAiBackend {
    client: Client,
    /// Sent as a system message before every conversation.
    system: Option<String>,
    enable_thinking: Option<bool>,
    /// The preset of a model named like one (its hub id or preset name).
    preset: Option<Preset>,
}

impl OpenAiBackend {
    /// `spec` is `openai:MODEL@BASE_URL`. A template or adapter for a local model is refused:
    /// the server applies its own template and loads its own weights.
    pub fn open(spec: &str, flag: &str, prompt: &PromptSettings, opts: &ClientOptions) -> Result<OpenAiBackend> {
        if prompt.chat_template.is_some() {
            bail!("--chat-template applies to the local engine; with {flag} the server applies its own template");
        }
        let endpoint = Endpoint::parse(spec, flag)?;
        let preset = preset::find(&endpoint.model);
        let client = Client::new(endpoint, opts.clone())?;
        Ok(OpenAiBackend { client, system: prompt.system.clone(), enable_thinking: prompt.enable_thinking, preset })
    }

    /// The body of one sample's request.
    fn chat_request(&self, r: &Request, s: &super::SampleRequest) -> ChatRequest {
        let mut messages = Vec::with_capacity(r.messages.len() + 1);
        if let Some(sys) = &self.system {
            messages.push(Message::system(sys.clone()));
        }
        messages.extend(r.messages.iter().cloned());
        let mut extra = serde_json::Map::new();
        if let Some(t) = self.enable_thinking {
            extra.insert("chat_template_kwargs".into(), json!({"enable_thinking": t}));
        }
        if let Some(f) = &r.label_format {
            extra.insert("response_format".into(), f.response_format());
        }
        let d = &s.decoding;
        if d.ignore_eos {
            // vLLM's and SGLang's extension; bsa serve takes it too.
            extra.insert("ignore_eos".into(), json!(true));
        }
        ChatRequest {
            messages,
            n: 1,
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k,
            min_p: d.min_p,
            max_tokens: d.max_new_tokens,
            seed: s.seed,
            stop: d.stop.clone(),
            extra,
        }
    }
}

impl Backend for OpenAiBackend {
    fn model_id(&self) -> &str {
        &self.client.endpoint.model
    }

    fn device(&self) -> String {
        format!("remote: {}", self.client.endpoint.base_url)
    }

    fn location(&self) -> String {
        self.client.endpoint.base_url.clone()
    }

    fn preset(&self) -> Option<&Preset> {
        self.preset.as_ref()
    }

    /// The preset's tags; the server's template decides whether the opening one is
    /// pre-filled, so it is never assumed.
    fn think(&self) -> ThinkConvention {
        self.preset.as_ref().map_or_else(ThinkConvention::default, |p| ThinkConvention { prefilled_open: false, ..p.think_convention() })
    }

    fn manifest_model(&self) -> Value {
        json!({"id": self.client.endpoint.model, "backend": self.client.describe()})
    }

    fn manifest_prompt(&self, system_flag: Option<&str>, rules: Option<&SafetyRules>) -> Value {
        json!({
            "chat_template": "the server's",
            "system": system_flag,
            // Rules go out as a system message; the server's template decides where it lands.
            "safety_rules": SafetyRules::manifest_entry(rules, Placement::System),
            "enable_thinking": self.enable_thinking,
        })
    }

    fn manifest_judge(&self) -> Value {
        json!({"model": self.client.endpoint.model, "endpoint": self.client.describe()})
    }

    fn complete(&mut self, requests: Vec<Request>, on_completion: &mut dyn FnMut(Completion) -> Result<()>, _: &mut dyn FnMut(Progress)) -> Result<()> {
        let mut calls = Vec::new();
        for r in &requests {
            if r.reply_start.is_some() {
                bail!("{}: an OpenAI-compatible server cannot be given the start of a reply ({})", self.client.endpoint.base_url, r.label);
            }
            for s in &r.samples {
                calls.push(((s.tag, r.label.as_str(), r.accept_refusal), self.chat_request(r, s)));
            }
        }
        let url = self.client.endpoint.chat_url();
        self.client.chat_all(calls, &mut |(tag, label, accept_refusal), reply| match reply {
            Ok(reply) => {
                let choice = reply.choices.into_iter().next().with_context(|| format!("{url}: a reply with no choice for {label}"))?;
                on_completion(choice.into_completion(tag, reply.prompt_tokens, reply.completion_tokens))
            }
            Err(r) if accept_refusal => on_completion(Completion::refused(tag, r.message)),
            Err(r) => Err(anyhow::Error::new(r).context(format!("the server refused {label}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_spec_parses_and_refuses() {
        let e = Endpoint::parse("openai:Qwen/QwQ-32B@http://gpu:8000/v1/", "--backend").unwrap();
        assert_eq!(e.model, "Qwen/QwQ-32B");
        assert_eq!(e.chat_url(), "http://gpu:8000/v1/chat/completions");
        for bad in ["local:x", "openai:model", "openai:@http://x/v1", "openai:m@ftp://x"] {
            let err = Endpoint::parse(bad, "--backend").unwrap_err().to_string();
            assert!(err.contains("--backend") && err.contains("openai:MODEL@BASE_URL"), "{err}");
        }
    }

    #[test]
    fn replies_in_every_reasoning_dialect_split_alike() {
        let think = ThinkConvention::default();
        let bodies = [
            r#"{"choices":[{"message":{"content":"Answer.","reasoning_content":"Risky."},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"message":{"content":"Answer.","reasoning":"Risky."},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"message":{"content":"<think>Risky.</think>Answer."},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"message":{"content":"Risky.\n</think>\n\nAnswer."},"finish_reason":"stop"}]}"#,
        ];
        for b in bodies {
            let r = parse_reply(b).unwrap();
            let s = r.choices[0].split(&think);
            assert_eq!((s.thinking.as_str(), s.response.as_str()), ("Risky.", "Answer."), "{b}");
        }
        let plain = parse_reply(r#"{"choices":[{"message":{"content":"Hi","reasoning_content":null}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#).unwrap();
        assert_eq!(plain.choices[0].split(&think).thinking, "");
        assert_eq!((plain.prompt_tokens, plain.completion_tokens), (3, 1));
        assert!(parse_reply("<html>busy</html>").is_none());
        assert!(parse_reply(r#"{"choices":[{"text":"legacy"}]}"#).is_none());
    }

    #[test]
    fn content_parts_and_nulls_are_read() {
        let reply = |message: Value| parse_reply(&json!({"choices": [{"message": message, "finish_reason": null}], "usage": null}).to_string()).unwrap();
        // Mistral's thinking is itself a list of text parts; a string part is text.
        let r = reply(json!({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "Ri"}, {"type": "text", "text": "sky."}]}, "Ans", {"type": "text", "text": "wer."}], "reasoning": null}));
        let c = &r.choices[0];
        assert_eq!((c.reasoning.as_deref(), c.content.as_str(), c.error.as_deref(), c.finish()), (Some("Risky."), "Answer.", None, FinishReason::Stop));
        assert_eq!((r.prompt_tokens, r.completion_tokens), (0, 0));
        // A reasoning field and thinking parts: the field first.
        let c = &reply(json!({"reasoning_content": "A.", "content": [{"type": "reasoning", "reasoning": "B."}, {"type": "output_text", "text": "C"}]})).choices[0];
        assert_eq!((c.reasoning.as_deref(), c.content.as_str()), (Some("A.B."), "C"));
        // A refusal beside a null content is the answer.
        assert_eq!(reply(json!({"content": null, "refusal": "I can't help with that."})).choices[0].content, "I can't help with that.");
        for (message, named) in [
            (json!({"content": [{"type": "text", "text": "x"}, {"type": "audio", "data": "..."}]}), "type \"audio\""),
            (json!({"content": [{"text": "untyped"}]}), "no type"),
            (json!({"content": [{"type": "text"}]}), "holds no text"),
            (json!({"content": {"type": "text", "text": "x"}}), "neither a text nor a list"),
        ] {
            let c = reply(message.clone()).choices[0].clone();
            let e = c.error.clone().unwrap_or_default();
            assert!(e.contains(named), "{message}: {e}");
            let done = c.into_completion(3, 0, 0);
            assert_eq!((done.finish, done.error.as_deref()), (FinishReason::Error, Some(e.as_str())));
        }
        assert!(parse_reply(r#"{"choices":[{"message":null}]}"#).is_none());
    }

    #[test]
    fn the_token_limit_goes_under_the_chosen_name_and_stream_asks_for_usage() {
        let r = ChatRequest { n: 1, max_tokens: 8, ..Default::default() };
        let b = r.wire_body("m", MaxTokensField::MaxCompletionTokens, true);
        assert_eq!((b.get("max_tokens"), b["max_completion_tokens"].as_u64()), (None, Some(8)));
        assert_eq!((b["stream"].as_bool(), b["stream_options"]["include_usage"].as_bool()), (Some(true), Some(true)));
        let b = r.wire_body("m", MaxTokensField::Auto, false);
        assert_eq!((b["max_tokens"].as_u64(), b.get("max_completion_tokens"), b.get("stream")), (Some(8), None, None));
        assert_eq!(MaxTokensField::parse("max_completion_tokens"), Ok(MaxTokensField::MaxCompletionTokens));
        assert!(MaxTokensField::parse("max").unwrap_err().contains("max_tokens, max_completion_tokens or auto"));
        let refusal = |e: Value| refuses_max_tokens(&e);
        assert!(refusal(json!({"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", "param": "max_tokens", "code": "unsupported_parameter"})));
        assert!(refusal(json!({"message": "max_tokens is not supported; use max_completion_tokens"})));
        assert!(!refusal(json!({"message": "max_tokens = 33 is out of range: 1 to 32", "param": "max_tokens"})));
        assert!(!refusal(json!({"message": "Unsupported parameter: 'top_k'", "param": "top_k", "code": "unsupported_parameter"})));
    }

    #[test]
    fn optional_sampling_fields_are_only_sent_when_on() {
        let mut r = ChatRequest { n: 1, temperature: 0.6, top_p: 0.95, max_tokens: 8, ..Default::default() };
        let b = r.body("m");
        assert!(b.get("top_k").is_none() && b.get("min_p").is_none() && b.get("seed").is_none() && b.get("stop").is_none());
        r.top_k = 20;
        r.seed = Some(7);
        r.stop = vec!["END".into()];
        let b = r.body("m");
        assert_eq!((b["top_k"].as_u64(), b["seed"].as_u64(), b["stop"][0].as_str()), (Some(20), Some(7), Some("END")));
    }

    #[test]
    fn the_key_never_prints() {
        std::env::set_var("BSA_TEST_KEY_PRINT", "sk-secret-123");
        let c = Client::new(
            Endpoint::parse("openai:m@http://127.0.0.1:9/v1", "--judge").unwrap(),
            ClientOptions { api_key_env: Some("BSA_TEST_KEY_PRINT".into()), ..Default::default() },
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("sk-secret"));
        assert!(!c.describe().to_string().contains("sk-secret"));
        let missing = ClientOptions { api_key_env: Some("BSA_TEST_KEY_ABSENT".into()), ..Default::default() };
        let err = Client::new(c.endpoint.clone(), missing).unwrap_err().to_string();
        assert!(err.contains("BSA_TEST_KEY_ABSENT") && err.contains("not set"), "{err}");
    }
}
