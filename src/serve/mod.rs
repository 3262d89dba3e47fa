//! `bsa serve`: the local engine behind an OpenAI-compatible HTTP API, so other tools (and
//! `bsa` itself, through `--backend openai:...` and `--judge openai:...`) can use it.
//!
//! One engine thread owns the model and the KV cache and runs the scheduler's loop; HTTP
//! threads check a request, render and tokenize its prompt, hand it to the engine over a
//! channel and wait for its samples. The engine takes new requests in before every step, so
//! concurrent requests decode together in one continuous batch. Work is bounded: requests
//! whose samples would push the queue past `max_queue` get a 429 at once (and open
//! connections past a limit a 503), so a flood costs memory in proportion to the limit, not
//! to the flood. Every bad request gets a 4xx with an OpenAI-style error body and the server
//! keeps serving.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::constraint::{Grammar, GrammarCompiler};
use crate::engine::kv_cache::KvCache;
use crate::backends::local::{completion_text, CacheSizing, LocalModel, StopMatcher};
use crate::backends::PrefillStats;
use crate::engine::load::{self, LoadedModel};
use crate::engine::scheduler::{self, Finished, Intake, PromptGroup, SampleSpec, SchedulerConfig};
use crate::engine::sampler::{SamplingParams, StreamKey};
use crate::engine::tokenizer::encode_prompt;
use crate::prompt::{split_completion, Message, Prompter, ThinkConvention};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: String,
    /// The name clients use in `model` (default: the preset name or the model's id). The
    /// `--model` argument itself is accepted too.
    pub served_model_name: Option<String>,
    pub host: String,
    /// 0 picks a free port (printed on start).
    pub port: u16,
    /// When set, requests must carry `Authorization: Bearer KEY` (`/health` excepted).
    pub api_key: Option<String>,
    pub device: String,
    pub dtype: String,
    pub batch_size: usize,
    pub prefill_chunk: usize,
    /// The KV cache's size and the longest sequence.
    pub cache: CacheSizing,
    /// Automatic prefix caching (see [`crate::backends::local::LocalOptions::prefix_cache`]).
    pub prefix_cache: bool,
    /// Most samples queued or decoding at once; more get 429.
    pub max_queue: usize,
    /// Most samples per request (`n`).
    pub max_n: u32,
    /// Most new tokens per sample (`max_tokens`), also the default.
    pub max_tokens: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model: "smollm2-135m".into(),
            served_model_name: None,
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            device: "auto".into(),
            dtype: "auto".into(),
            batch_size: 64,
            prefill_chunk: 512,
            cache: CacheSizing::default(),
            prefix_cache: true,
            max_queue: 256,
            max_n: 16,
            max_tokens: 4096,
            max_body_bytes: 4 << 20,
        }
    }
}

/// Counters of a running server (what `/health` reports).
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Samples queued or decoding now, and the most there ever were.
    pub queued_samples: AtomicUsize,
    pub peak_queued_samples: AtomicUsize,
    pub completed_requests: AtomicUsize,
    pub rejected_busy: AtomicUsize,
    /// Engine steps that decoded at least one token, and the tokens they decoded: their
    /// ratio is the mean decode batch, the proof that concurrent requests share steps.
    pub decode_steps: AtomicUsize,
    pub decode_tokens: AtomicUsize,
    /// Tokens prefilled (prompts, and sequences set aside and recomputed), and prompt tokens
    /// taken from the prefix cache instead of being prefilled.
    pub prefill_tokens: AtomicUsize,
    pub cached_prefill_tokens: AtomicUsize,
    /// Whether the prefix cache is on (`--no-prefix-cache` turns it off).
    pub prefix_cache: std::sync::atomic::AtomicBool,
    open_connections: AtomicUsize,
}

impl ServeStats {
    pub fn snapshot(&self) -> Value {
        let l = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        json!({
            "queued_samples": l(&self.queued_samples),
            "peak_queued_samples": l(&self.peak_queued_samples),
            "completed_requests": l(&self.completed_requests),
            "rejected_busy": l(&self.rejected_busy),
            "decode_steps": l(&self.decode_steps),
            "decode_tokens": l(&self.decode_tokens),
            "prefill_tokens": l(&self.prefill_tokens),
            "cached_prefill_tokens": l(&self.cached_prefill_tokens),
            "prefix_cache": self.prefix_cache.load(Ordering::Relaxed),
            "prefix_cache_hit_rate": PrefillStats { computed: l(&self.prefill_tokens), cached: l(&self.cached_prefill_tokens) }.hit_rate(),
        })
    }
}

/// A request handed to the engine: one prompt, its samples, their stop strings.
struct Job {
    prompt: Vec<u32>,
    samples: Vec<(SamplingParams, StreamKey, usize)>,
    /// `response_format`'s grammar, for every sample.
    grammar: Option<Arc<Grammar>>,
    stop: Vec<String>,
    /// vLLM's `ignore_eos`: every sample runs to its max_tokens.
    ignore_eos: bool,
    reply: mpsc::Sender<Vec<Finished>>,
}

/// What HTTP threads share: the prompt side of the model and the limits.
struct Frontend {
    names: Vec<String>,
    tokenizer: tokenizers::Tokenizer,
    /// Structured output (`response_format`), built by the first request that asks for it
    /// (it takes about half a second for a 49k vocabulary, which a server that never sees
    /// one should not pay at start); Err: why this model's tokenizer has none.
    grammars: std::sync::OnceLock<std::result::Result<GrammarCompiler, String>>,
    /// The logits width and end-of-sequence token the compiler needs besides the tokenizer.
    grammar_vocab: (usize, u32),
    bos: Option<(u32, String)>,
    prompter: Prompter,
    think: ThinkConvention,
    /// Most tokens of one sequence, prompt and max_tokens (the cache plan's `max_model_len`).
    max_model_len: usize,
    opts: ServeOptions,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    engine_error: Mutex<Option<String>>,
    stats: Arc<ServeStats>,
    next_id: AtomicUsize,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    http: Arc<tiny_http::Server>,
    front: Arc<Frontend>,
    accept: Option<std::thread::JoinHandle<()>>,
    engine: Option<std::thread::JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
}

impl Server {
    /// Loads the model, binds the address and starts serving in background threads.
    pub fn start(opts: ServeOptions) -> Result<Server> {
        if opts.max_queue == 0 || opts.max_n == 0 || opts.max_tokens == 0 {
            anyhow::bail!("--max-queue, --max-n and --max-tokens must be at least 1");
        }
        let device = load::device(&opts.device)?;
        let dtype = load::dtype(&opts.dtype, &device)?;
        let local = LocalModel::load(&opts.model, &device, dtype)?;
        let prompter = Prompter::new(&local.prompt_format(), &Default::default())?;
        let plan = local.plan_cache(&opts.cache, &device, dtype, opts.batch_size, opts.prefill_chunk)?;
        let mut cache = local.kv_cache(&plan, &device)?;
        cache.set_prefix_caching(opts.prefix_cache);
        eprintln!("{}", plan.describe());
        let m = local.loaded;
        let mut names = vec![opts.served_model_name.clone().unwrap_or_else(|| m.description.id.clone())];
        for alias in [opts.model.clone(), m.description.id.clone()] {
            if !names.contains(&alias) {
                names.push(alias);
            }
        }
        let bind = format!("{}:{}", opts.host, opts.port);
        let http = tiny_http::Server::http(&bind).map_err(|e| anyhow!("cannot listen on {bind}: {e}; pick another --port or --host"))?;
        let addr = http.server_addr().to_ip().ok_or_else(|| anyhow!("{bind} is not an IP address"))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(ServeStats::default());
        stats.prefix_cache.store(opts.prefix_cache, Ordering::Relaxed);
        let front = Arc::new(Frontend {
            names,
            tokenizer: m.tokenizer.clone(),
            grammars: std::sync::OnceLock::new(),
            grammar_vocab: (m.config.vocab_size, m.eos_ids.first().copied().unwrap_or(0)),
            bos: m.add_bos.then_some(m.bos_id).flatten().zip(m.bos_token.clone()),
            think: prompter.think().clone(),
            prompter,
            max_model_len: plan.max_model_len,
            opts: opts.clone(),
            jobs: Mutex::new(Some(tx)),
            engine_error: Mutex::new(None),
            stats: stats.clone(),
            next_id: AtomicUsize::new(0),
        });
        let sched = SchedulerConfig { max_batch: opts.batch_size, prefill_chunk: opts.prefill_chunk, eos: m.eos_ids.clone(), max_model_len: Some(plan.max_model_len) };
        let engine_front = front.clone();
        let engine = std::thread::Builder::new().name("bsa-engine".into()).spawn(move || {
            if let Err(e) = engine_loop(m, cache, sched, rx, &engine_front.stats) {
                // The waiting HTTP threads see their reply channels close and answer 500.
                *engine_front.engine_error.lock().unwrap() = Some(format!("{e:#}"));
                engine_front.jobs.lock().unwrap().take();
            }
        })?;
        let http = Arc::new(http);
        let stopping = Arc::new(AtomicBool::new(false));
        let (accept_http, accept_front, accept_stop) = (http.clone(), front.clone(), stopping.clone());
        let accept = std::thread::Builder::new().name("bsa-http".into()).spawn(move || accept_loop(&accept_http, &accept_front, &accept_stop))?;
        Ok(Server { addr, http, front, accept: Some(accept), engine: Some(engine), stopping })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name clients put in `model`.
    pub fn model_name(&self) -> &str {
        &self.front.names[0]
    }

    pub fn stats(&self) -> Arc<ServeStats> {
        self.front.stats.clone()
    }

    /// Serves until the process ends (or the engine fails, which is returned).
    pub fn wait(mut self) -> Result<()> {
        if let Some(h) = self.engine.take() {
            let _ = h.join();
        }
        match self.front.engine_error.lock().unwrap().clone() {
            Some(e) => Err(anyhow!("the engine stopped: {e}")),
            None => Ok(()),
        }
    }

    /// Stops accepting, lets the engine finish what it holds, and joins the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.http.unblock();
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        self.front.jobs.lock().unwrap().take();
        if let Some(h) = self.engine.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Per-request bookkeeping inside the engine thread.
struct Pending {
    results: Vec<Option<Finished>>,
    left: usize,
    reply: mpsc::Sender<Vec<Finished>>,
}

fn engine_loop(m: LoadedModel, mut cache: KvCache, sched: SchedulerConfig, rx: mpsc::Receiver<Job>, stats: &ServeStats) -> Result<()> {
    // Scheduler tags map to (request, choice); the three closures share the table.
    let jobs: RefCell<HashMap<usize, Pending>> = RefCell::new(HashMap::new());
    let tags: RefCell<HashMap<usize, (usize, usize)>> = RefCell::new(HashMap::new());
    let tokenizer = &m.tokenizer;
    // Each sample's stop strings, matched as it decodes.
    let matchers: RefCell<HashMap<usize, StopMatcher>> = RefCell::new(HashMap::new());
    let mut next_job = 0usize;
    let mut next_tag = 0usize;
    let mut feed = |idle: bool| -> Result<Intake> {
        let first = if idle {
            match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => return Ok(Intake::Closed),
            }
        } else {
            None
        };
        let mut groups = Vec::new();
        for job in first.into_iter().chain(rx.try_iter()) {
            let id = next_job;
            next_job += 1;
            let mut samples = Vec::with_capacity(job.samples.len());
            for (i, (params, stream, max_new_tokens)) in job.samples.iter().enumerate() {
                tags.borrow_mut().insert(next_tag, (id, i));
                if !job.stop.is_empty() {
                    matchers.borrow_mut().insert(next_tag, StopMatcher::new(tokenizer, &job.stop));
                }
                samples.push(SampleSpec { tag: next_tag, params: *params, stream: *stream, max_new_tokens: *max_new_tokens, ignore_eos: job.ignore_eos, grammar: job.grammar.clone() });
                next_tag += 1;
            }
            let n = samples.len();
            jobs.borrow_mut().insert(id, Pending { results: vec![None; n], left: n, reply: job.reply });
            groups.push(PromptGroup { prompt: job.prompt, samples });
        }
        Ok(Intake::Groups(groups))
    };
    let mut stop = |tag: usize, toks: &[u32]| -> bool { matchers.borrow_mut().get_mut(&tag).is_some_and(|m| m.hit(toks)) };
    let mut on_done = |f: Finished| -> Result<()> {
        matchers.borrow_mut().remove(&f.tag);
        let (id, i) = tags.borrow_mut().remove(&f.tag).expect("every tag was registered");
        let mut jobs = jobs.borrow_mut();
        let p = jobs.get_mut(&id).expect("a request outlives its samples");
        p.results[i] = Some(f);
        p.left -= 1;
        if p.left == 0 {
            let p = jobs.remove(&id).unwrap();
            // A client that went away no longer listens; that is not the engine's problem.
            let _ = p.reply.send(p.results.into_iter().map(|r| r.expect("all finished")).collect());
        }
        Ok(())
    };
    let mut on_step = |s: scheduler::StepStats| {
        if s.decode_tokens > 0 {
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats.decode_tokens.fetch_add(s.decode_tokens, Ordering::Relaxed);
        }
        stats.prefill_tokens.fetch_add(s.prefill_tokens, Ordering::Relaxed);
        stats.cached_prefill_tokens.fetch_add(s.cached_prefill_tokens, Ordering::Relaxed);
    };
    scheduler::run_fed(m.model.as_ref(), &mut cache, &sched, &mut feed, &mut stop, &mut on_done, &mut on_step)
}

/// An HTTP error in the OpenAI shape.
#[derive(Debug)]
struct ApiError {
    status: u16,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn bad(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", code: None, param, message: message.into() }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

fn accept_loop(http: &tiny_http::Server, front: &Arc<Frontend>, stopping: &AtomicBool) {
    // Connections beyond the queue bound (plus room for cheap requests such as /health)
    // are refused here, before a thread is spent on them.
    let max_open = front.opts.max_queue + 64;
    for req in http.incoming_requests() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let stats = &front.stats;
        if stats.open_connections.fetch_add(1, Ordering::SeqCst) >= max_open {
            stats.open_connections.fetch_sub(1, Ordering::SeqCst);
            stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
            let e = ApiError { status: 503, kind: "server_error", code: Some("server_busy"), param: None, message: "too many open requests; retry shortly".into() };
            respond(req, e.status, &e.body(), true);
            continue;
        }
        let front = front.clone();
        let spawned = std::thread::Builder::new().name("bsa-request".into()).spawn(move || {
            handle(&front, req);
            front.stats.open_connections.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            stats.open_connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn respond(req: tiny_http::Request, status: u16, body: &Value, retry_after: bool) {
    let mut resp = tiny_http::Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(tiny_http::Header::from_bytes("Content-Type", "application/json").expect("valid header"));
    if retry_after {
        resp = resp.with_header(tiny_http::Header::from_bytes("Retry-After", "1").expect("valid header"));
    }
    // The client may have gone; nothing to do about it.
    let _ = req.respond(resp);
}

fn handle(front: &Frontend, mut req: tiny_http::Request) {
    let result = route(front, &mut req);
    match result {
        Ok(body) => respond(req, 200, &body, false),
        Err(e) => respond(req, e.status, &e.body(), e.status == 429 || e.status == 503),
    }
}

fn route(front: &Frontend, req: &mut tiny_http::Request) -> Result<Value, ApiError> {
    let path = req.url().split('?').next().unwrap_or("").trim_end_matches('/').to_string();
    let method = req.method().clone();
    if path == "/health" {
        let err = front.engine_error.lock().unwrap().clone();
        return match err {
            None => Ok(json!({"status": "ok", "model": front.names[0], "stats": front.stats.snapshot()})),
            Some(e) => Err(ApiError { status: 503, kind: "server_error", code: Some("engine_stopped"), param: None, message: format!("the engine stopped: {e}") }),
        };
    }
    if let Some(key) = &front.opts.api_key {
        let given = req.headers().iter().find(|h| h.field.equiv("Authorization")).map(|h| h.value.as_str().trim().to_string());
        if given.as_deref().and_then(|g| g.strip_prefix("Bearer ")).map(str::trim) != Some(key.as_str()) {
            return Err(ApiError { status: 401, kind: "invalid_request_error", code: Some("invalid_api_key"), param: None, message: "missing or wrong API key: send Authorization: Bearer KEY".into() });
        }
    }
    match (method, path.as_str()) {
        (tiny_http::Method::Get, "/v1/models") => Ok(json!({
            "object": "list",
            "data": [{"id": front.names[0], "object": "model", "created": unix_now(), "owned_by": "bsa", "max_model_len": front.max_model_len}],
        })),
        (tiny_http::Method::Post, "/v1/chat/completions") => {
            let mut body = Vec::new();
            let limit = front.opts.max_body_bytes;
            req.as_reader().take(limit as u64 + 1).read_to_end(&mut body).map_err(|e| ApiError::bad(None, format!("reading the request body: {e}")))?;
            if body.len() > limit {
                return Err(ApiError { status: 413, kind: "invalid_request_error", code: Some("request_too_large"), param: None, message: format!("the request body is over {limit} bytes") });
            }
            chat_completion(front, &body)
        }
        (_, "/v1/models" | "/v1/chat/completions") => Err(ApiError { status: 405, kind: "invalid_request_error", code: Some("method_not_allowed"), param: None, message: format!("{} is not allowed on {path}", req.method()) }),
        _ => Err(ApiError { status: 404, kind: "invalid_request_error", code: Some("not_found"), param: None, message: format!("no route {path}; this server has POST /v1/chat/completions, GET /v1/models, GET /health") }),
    }
}

/// The request fields the server reads (others, e.g. `user`, are ignored as OpenAI does).
#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<WireMessage>,
    n: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// vLLM writes -1 for "off".
    top_k: Option<i64>,
    min_p: Option<f32>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    seed: Option<i64>,
    stop: Option<StopField>,
    #[serde(default)]
    stream: bool,
    response_format: Option<Value>,
    /// vLLM's extension: end-of-sequence tokens do not end a sample.
    ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

fn chat_completion(front: &Frontend, raw: &[u8]) -> Result<Value, ApiError> {
    let body: ChatBody = serde_json::from_slice(raw).map_err(|e| ApiError::bad(None, format!("the body is not a valid chat completion request: {e}")))?;
    if !front.names.contains(&body.model) {
        return Err(ApiError {
            status: 404,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message: format!("the model {:?} is not served here; this server has {:?}", body.model, front.names[0]),
        });
    }
    if body.stream {
        return Err(ApiError::bad(Some("stream"), "streaming is not supported; send stream: false"));
    }
    if body.messages.is_empty() {
        return Err(ApiError::bad(Some("messages"), "messages is empty; send at least one user message"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
            return Err(ApiError::bad(Some("messages"), format!("messages[{i}].role {:?}: use system, user or assistant", m.role)));
        }
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        messages.push(Message::new(role, content_text(&m.content).ok_or_else(|| ApiError::bad(Some("messages"), format!("messages[{i}].content must be a string or a list of text parts")))?));
    }
    let opts = &front.opts;
    let n = body.n.unwrap_or(1);
    if n < 1 || n > opts.max_n as i64 {
        return Err(ApiError::bad(Some("n"), format!("n = {n} is out of range: 1 to {}", opts.max_n)));
    }
    let n = n as usize;
    let params = SamplingParams {
        temperature: body.temperature.unwrap_or(1.0),
        top_p: body.top_p.unwrap_or(1.0),
        top_k: body.top_k.filter(|&k| k > 0).unwrap_or(0) as usize,
        min_p: body.min_p.unwrap_or(0.0),
    };
    params.validate().map_err(|e| {
        let param = ["temperature", "top_p", "top_k", "min_p"].into_iter().find(|p| e.starts_with(p));
        ApiError::bad(param, e)
    })?;
    let text = front.prompter.render_messages(&messages).map_err(|e| ApiError::bad(Some("messages"), format!("the chat template refused the messages: {e:#}")))?;
    let prompt = encode_prompt(&front.tokenizer, front.bos.as_ref().map(|(id, t)| (*id, t.as_str())), &text).map_err(|e| ApiError::bad(Some("messages"), format!("{e:#}")))?;
    let room = front.max_model_len.saturating_sub(prompt.len());
    let max_tokens = match body.max_completion_tokens.or(body.max_tokens) {
        Some(t) if t < 1 || t > opts.max_tokens as i64 => {
            return Err(ApiError::bad(Some("max_tokens"), format!("max_tokens = {t} is out of range: 1 to {}", opts.max_tokens)));
        }
        Some(t) => t as usize,
        None => opts.max_tokens.min(room.max(1)),
    };
    // As vLLM does: a request that cannot reach its max_tokens under the length limit is
    // refused rather than cut short.
    if prompt.len() + max_tokens > front.max_model_len {
        return Err(ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("messages"),
            message: format!(
                "the prompt ({} tokens) plus max_tokens ({max_tokens}) is over the {} tokens this server can hold for one sequence; shorten the messages or lower max_tokens",
                prompt.len(),
                front.max_model_len
            ),
        });
    }
    let stop = match body.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.iter().any(String::is_empty) || stop.len() > 16 {
        return Err(ApiError::bad(Some("stop"), "stop takes up to 16 non-empty strings"));
    }
    let grammar = response_format_grammar(front, body.response_format.as_ref())?;
    let seed = body.seed.map(|s| s as u64).unwrap_or_else(|| unix_nanos() ^ front.next_id.load(Ordering::Relaxed) as u64);
    let samples = (0..n).map(|j| (params, StreamKey::new(seed, "", j as u32), max_tokens)).collect();

    // Admission: the queue bound counts samples, the unit of engine memory.
    let stats = &front.stats;
    let before = stats.queued_samples.fetch_add(n, Ordering::SeqCst);
    if before + n > opts.max_queue {
        stats.queued_samples.fetch_sub(n, Ordering::SeqCst);
        stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError { status: 429, kind: "rate_limit_error", code: Some("server_busy"), param: None, message: format!("the server is busy ({before} samples queued, limit {}); retry after a second", opts.max_queue) });
    }
    stats.peak_queued_samples.fetch_max(before + n, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    let prompt_tokens = prompt.len();
    let sent = front.jobs.lock().unwrap().as_ref().map(|jobs| jobs.send(Job { prompt, samples, grammar, stop: stop.clone(), ignore_eos: body.ignore_eos.unwrap_or(false), reply: tx }).is_ok()).unwrap_or(false);
    let finished = if sent { rx.recv().ok() } else { None };
    stats.queued_samples.fetch_sub(n, Ordering::SeqCst);
    let finished = finished.ok_or_else(|| {
        let why = front.engine_error.lock().unwrap().clone().unwrap_or_else(|| "the server is shutting down".into());
        ApiError { status: 503, kind: "server_error", code: Some("engine_stopped"), param: None, message: format!("the engine is not running: {why}") }
    })?;
    stats.completed_requests.fetch_add(1, Ordering::Relaxed);
    Ok(completion_body(front, &body.model, prompt_tokens, &stop, finished))
}

/// The grammar of a request's `response_format`: none for `text` (or no field), any JSON
/// object for `json_object`, the schema of `json_schema` (`{"json_schema": {"schema": ...}}`),
/// decoded under llguidance like a local judge's labels.
fn response_format_grammar(front: &Frontend, format: Option<&Value>) -> Result<Option<Arc<Grammar>>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else { return Ok(None) };
    let bad = |m: String| ApiError::bad(Some("response_format"), m);
    let schema = match format.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => serde_json::json!({"type": "object"}),
        Some("json_schema") => format
            .get("json_schema")
            .and_then(|j| j.get("schema"))
            .cloned()
            .ok_or_else(|| bad("response_format of type json_schema needs json_schema.schema".into()))?,
        other => return Err(bad(format!("response_format type {other:?} is not supported; use text, json_object or json_schema"))),
    };
    let (vocab_size, eos) = front.grammar_vocab;
    let compiler = front
        .grammars
        .get_or_init(|| GrammarCompiler::new(&front.tokenizer, vocab_size, eos).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| bad(format!("this model's tokenizer does not support structured output: {e}")))?;
    compiler.compile_json_schema(&schema).map(Some).map_err(|e| bad(format!("response_format: {e:#}")))
}

fn completion_body(front: &Frontend, model: &str, prompt_tokens: usize, stop: &[String], finished: Vec<Finished>) -> Value {
    let mut completion_tokens = 0;
    let choices: Vec<Value> = finished
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            completion_tokens += f.tokens.len();
            let text = completion_text(&front.tokenizer, &f.tokens, stop, f.finish == scheduler::FinishReason::StopString).unwrap_or_default();
            let split = split_completion(&text, &front.think);
            let thinking = (!split.thinking.is_empty()).then_some(split.thinking);
            json!({
                "index": i,
                "message": {"role": "assistant", "content": split.response, "reasoning_content": thinking, "reasoning": thinking},
                "finish_reason": openai_finish_reason(f.finish),
                "logprobs": null,
            })
        })
        .collect();
    let id = front.next_id.fetch_add(1, Ordering::Relaxed);
    json!({
        "id": format!("chatcmpl-bsa-{id}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    })
}

/// The OpenAI protocol's `finish_reason`: a stop string is a "stop" there.
fn openai_finish_reason(f: scheduler::FinishReason) -> &'static str {
    match f {
        scheduler::FinishReason::Stop | scheduler::FinishReason::StopString | scheduler::FinishReason::GrammarComplete => "stop",
        scheduler::FinishReason::Length => "length",
        // Not in OpenAI's list; vLLM reports an aborted sample as "abort", an engine error as "error".
        scheduler::FinishReason::Error => "error",
    }
}

/// The text of a message's content: a string, or OpenAI's list of `{type: text, text}` parts.
fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some(String::new()),
        Value::Array(parts) => parts.iter().map(|p| p.get("text").and_then(Value::as_str)).collect::<Option<Vec<_>>>().map(|t| t.concat()),
        _ => None,
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// `bsa serve`: starts the server, prints where it listens, serves until killed.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let server = Server::start(opts).context("starting bsa serve")?;
    // Tests and scripts read this line to learn the port (with --port 0).
    println!("bsa serve: {} listening on http://{}/v1", server.model_name(), server.addr());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.wait()
}
