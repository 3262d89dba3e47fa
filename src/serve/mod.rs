//! `bsa serve`: the local engine behind an OpenAI-compatible HTTP API, so other tools (and
//! `bsa` itself, through `--backend openai:...` and `--judge openai:...`) can use it.
//!
//! Three parts, data flowing one way: `http` (hyper and axum on a small tokio runtime:
//! kept-alive connections served concurrently, timeouts, body limits, admission) hands a
//! request's raw body to `protocol` (the OpenAI fields checked, the messages rendered and
//! tokenized, on a blocking thread), and the prepared request to `engine` (one thread owning
//! the model and the KV cache, running the scheduler; concurrent requests decode in one
//! continuous batch), whose events `http` turns into a reply or a stream of server-sent
//! events (`stream` keeps a streamed answer equal to the non-streamed one).
//!
//! Work is bounded before it costs memory: body bytes being read or tokenized (a byte
//! budget, checked from Content-Length before reading), samples queued or decoding
//! (`max_queue`; 429 with a Retry-After from the engine's measured pace), open connections,
//! and the time a client may take to send its headers and body (408). A prompt too long for
//! the context is refused from its byte length, before it is tokenized. Every bad request
//! gets a 4xx with an OpenAI-style error body and the server keeps serving.

mod engine;
mod http;
mod protocol;
mod stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

use crate::backends::local::{CacheSizing, LocalModel};
use crate::backends::PrefillStats;
use crate::engine::constraint::GrammarCompiler;
use crate::engine::load;
use crate::engine::scheduler::SchedulerConfig;
use crate::engine::tokenizer::max_text_bytes_per_token;
use crate::prompt::Prompter;

pub use engine::DrainEstimate;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: String,
    /// The name clients use in `model` (default: a model file's stem, else the preset name
    /// or hub id). The `--model` argument itself and the model's id are accepted too.
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
    /// A Jinja chat template to use instead of the model's (`--chat-template`).
    pub chat_template: Option<std::path::PathBuf>,
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
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most request-body bytes being read, parsed or tokenized at once (503 beyond): what
    /// bounds the memory a flood of large bodies can take.
    pub max_inflight_bytes: usize,
    /// Most open connections (503 beyond).
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and then its body (408).
    /// Also how long a kept-alive connection may sit idle.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// On SIGINT/SIGTERM (or [`Server::stop`]): how long requests in flight may take to
    /// finish before they are cancelled.
    pub shutdown_grace: Duration,
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
            chat_template: None,
            cache: CacheSizing::default(),
            prefix_cache: true,
            max_queue: 256,
            max_n: 16,
            max_tokens: 4096,
            max_body_bytes: 4 << 20,
            max_inflight_bytes: 32 << 20,
            max_connections: 1024,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Counters of a running server (what `/health` reports).
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Samples queued or decoding now, and the most there ever were.
    pub queued_samples: AtomicUsize,
    pub peak_queued_samples: AtomicUsize,
    /// The sum of the queued samples' max_tokens (their mean is the length a sample is
    /// assumed to take before any has finished).
    pub queued_max_tokens: AtomicUsize,
    /// Samples in the running batch after the last step.
    pub running_samples: AtomicUsize,
    pub completed_requests: AtomicUsize,
    /// Requests refused for lack of room (429 and 503).
    pub rejected_busy: AtomicUsize,
    /// Samples ended early because their client went away.
    pub cancelled_samples: AtomicUsize,
    /// Engine steps that decoded at least one token, and the tokens they decoded: their
    /// ratio is the mean decode batch, the proof that concurrent requests share steps.
    pub decode_steps: AtomicUsize,
    pub decode_tokens: AtomicUsize,
    /// Tokens prefilled (prompts, and sequences set aside and recomputed), and prompt tokens
    /// taken from the prefix cache instead of being prefilled.
    pub prefill_tokens: AtomicUsize,
    pub cached_prefill_tokens: AtomicUsize,
    /// Whether the prefix cache is on (`--no-prefix-cache` turns it off).
    pub prefix_cache: AtomicBool,
    pub open_connections: AtomicUsize,
    /// Connections accepted since the start (kept-alive clients reuse theirs).
    pub accepted_connections: AtomicUsize,
    /// The engine's pace, for Retry-After.
    pub drain: Mutex<DrainEstimate>,
}

impl ServeStats {
    pub fn snapshot(&self) -> Value {
        let l = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        json!({
            "queued_samples": l(&self.queued_samples),
            "peak_queued_samples": l(&self.peak_queued_samples),
            "running_samples": l(&self.running_samples),
            "completed_requests": l(&self.completed_requests),
            "rejected_busy": l(&self.rejected_busy),
            "cancelled_samples": l(&self.cancelled_samples),
            "open_connections": l(&self.open_connections),
            "accepted_connections": l(&self.accepted_connections),
            "decode_steps": l(&self.decode_steps),
            "decode_tokens": l(&self.decode_tokens),
            "prefill_tokens": l(&self.prefill_tokens),
            "cached_prefill_tokens": l(&self.cached_prefill_tokens),
            "prefix_cache": self.prefix_cache.load(Ordering::Relaxed),
            "prefix_cache_hit_rate": PrefillStats { computed: l(&self.prefill_tokens), cached: l(&self.cached_prefill_tokens) }.hit_rate(),
        })
    }
}

/// What the HTTP side shares: the prompt side of the model, the limits and the way to the
/// engine.
struct Frontend {
    names: Vec<String>,
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// Structured output (`response_format`), built by the first request that asks for it
    /// (it takes about half a second for a 49k vocabulary, which a server that never sees
    /// one should not pay at start); Err: why this model's tokenizer has none.
    grammars: std::sync::OnceLock<std::result::Result<GrammarCompiler, String>>,
    /// The logits width and end-of-sequence token the compiler needs besides the tokenizer.
    grammar_vocab: (usize, u32),
    /// Every token's bytes for logprobs ([`protocol::token_bytes`]), read by the first
    /// request that asks for logprobs.
    token_bytes: std::sync::OnceLock<Option<Vec<Vec<u8>>>>,
    bos: Option<(u32, String)>,
    prompter: Prompter,
    /// Most tokens of one sequence, prompt and max_tokens (the cache plan's `max_model_len`).
    max_model_len: usize,
    /// The most bytes of text one token stands for: a text longer than `max_model_len`
    /// times this cannot fit, which is known without tokenizing it.
    max_bytes_per_token: usize,
    opts: ServeOptions,
    jobs: Mutex<Option<mpsc::Sender<engine::Job>>>,
    engine_error: Mutex<Option<String>>,
    stats: Arc<ServeStats>,
    next_id: AtomicUsize,
    /// Request-body bytes being read, parsed or tokenized, in KiB permits
    /// (`max_inflight_bytes`).
    body_budget: Arc<tokio::sync::Semaphore>,
    /// Turns true when the shutdown grace has passed: requests still waiting on the engine
    /// answer 503 `shutting_down` (a stream: an error event and `[DONE]`) and cancel their
    /// samples, so every client is told why rather than cut off.
    past_grace: tokio::sync::watch::Sender<bool>,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    front: Arc<Frontend>,
    runtime: Option<tokio::runtime::Runtime>,
    /// Tells the accept loop to stop and the connections to wind down.
    shutdown: tokio::sync::watch::Sender<bool>,
    /// The accept loop, which returns once every connection has closed after a shutdown.
    accept: Option<tokio::task::JoinHandle<()>>,
    engine: Option<std::thread::JoinHandle<()>>,
    /// Becomes true when the engine thread ends (failed, or done after shutdown).
    engine_ended: tokio::sync::watch::Receiver<bool>,
}

impl Server {
    /// Loads the model, binds the address and starts serving in background threads.
    pub fn start(opts: ServeOptions) -> Result<Server> {
        if opts.max_queue == 0 || opts.max_n == 0 || opts.max_tokens == 0 {
            anyhow::bail!("--max-queue, --max-n and --max-tokens must be at least 1");
        }
        if opts.max_inflight_bytes < opts.max_body_bytes {
            anyhow::bail!(
                "--max-inflight-mb ({} MiB) must be at least --max-body-mb ({} MiB): the budget must hold one largest body; raise it or lower --max-body-mb",
                opts.max_inflight_bytes >> 20,
                opts.max_body_bytes >> 20
            );
        }
        let device = load::device(&opts.device)?;
        let dtype = load::dtype(&opts.dtype, &device)?;
        let local = LocalModel::load(&opts.model, &device, dtype)?;
        let settings = crate::prompt::PromptSettings { chat_template: opts.chat_template.clone(), ..Default::default() };
        let prompter = Prompter::new(&local.prompt_format(), &settings)?;
        let plan = local.plan_cache(&opts.cache, &device, dtype, opts.batch_size, opts.prefill_chunk)?;
        let mut cache = local.kv_cache(&plan, &device)?;
        cache.set_prefix_caching(opts.prefix_cache);
        eprintln!("{}", plan.describe());
        let m = local.loaded;
        // The default name: a model file's stem (a GGUF's `general.name` can hold spaces),
        // else the preset name or hub id; the other spellings are accepted too.
        let path = std::path::Path::new(&opts.model);
        let stem = path.is_file().then(|| path.file_stem()).flatten().map(|s| s.to_string_lossy().into_owned());
        let default_name = stem.clone().unwrap_or_else(|| m.description.id.clone());
        let mut names = vec![opts.served_model_name.clone().unwrap_or(default_name)];
        for alias in [opts.model.clone(), m.description.id.clone()].into_iter().chain(stem) {
            if !names.contains(&alias) {
                names.push(alias);
            }
        }
        // Few blocking threads (they parse and tokenize): each is a malloc arena, and a flood of
        // large bodies spread over hundreds of them kept hundreds of MB resident.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).max_blocking_threads(4).thread_name("bsa-http").enable_all().build().context("starting the HTTP runtime")?;
        let bind = format!("{}:{}", opts.host, opts.port);
        let listener = runtime.block_on(tokio::net::TcpListener::bind(&bind)).map_err(|e| anyhow!("cannot listen on {bind}: {e}; pick another --port or --host"))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel::<engine::Job>();
        let stats = Arc::new(ServeStats::default());
        stats.prefix_cache.store(opts.prefix_cache, Ordering::Relaxed);
        let front = Arc::new(Frontend {
            names,
            tokenizer: Arc::new(m.tokenizer.clone()),
            grammars: std::sync::OnceLock::new(),
            token_bytes: std::sync::OnceLock::new(),
            grammar_vocab: (m.config.vocab_size, m.eos_ids.first().copied().unwrap_or(0)),
            bos: m.add_bos.then_some(m.bos_id).flatten().zip(m.bos_token.clone()),
            prompter,
            max_model_len: plan.max_model_len,
            max_bytes_per_token: max_text_bytes_per_token(&m.tokenizer),
            opts: opts.clone(),
            jobs: Mutex::new(Some(tx)),
            engine_error: Mutex::new(None),
            stats: stats.clone(),
            next_id: AtomicUsize::new(0),
            body_budget: Arc::new(tokio::sync::Semaphore::new(opts.max_inflight_bytes / 1024)),
            past_grace: tokio::sync::watch::channel(false).0,
        });
        let sched = SchedulerConfig { max_batch: opts.batch_size, prefill_chunk: opts.prefill_chunk, eos: m.eos_ids.clone(), max_model_len: Some(plan.max_model_len) };
        let engine_front = front.clone();
        let (ended_tx, engine_ended) = tokio::sync::watch::channel(false);
        let engine = std::thread::Builder::new().name("bsa-engine".into()).spawn(move || {
            if let Err(e) = engine::run(m, cache, sched, rx, &engine_front.stats) {
                // The waiting requests see their event channels close and answer 503.
                *engine_front.engine_error.lock().unwrap() = Some(format!("{e:#}"));
                engine_front.jobs.lock().unwrap().take();
            }
            let _ = ended_tx.send(true);
        })?;
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let accept = runtime.spawn(http::accept_loop(listener, front.clone(), shutdown_rx));
        Ok(Server { addr, front, runtime: Some(runtime), shutdown, accept: Some(accept), engine: Some(engine), engine_ended })
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

    /// Serves until SIGINT or SIGTERM (then shuts down gracefully and returns Ok) or until
    /// the engine fails (returned as the error).
    pub fn wait(mut self) -> Result<()> {
        let mut ended = self.engine_ended.clone();
        let signal = self.runtime.as_ref().expect("running").block_on(async move {
            let term = async {
                #[cfg(unix)]
                {
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                        Ok(mut s) => {
                            s.recv().await;
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                }
                #[cfg(not(unix))]
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => Some("SIGINT"),
                _ = term => Some("SIGTERM"),
                _ = ended.wait_for(|e| *e) => None,
            }
        });
        if let Some(sig) = signal {
            eprintln!(
                "bsa serve: {sig}: not accepting new connections; finishing {} queued or running (up to {} s)",
                samples(self.front.stats.queued_samples.load(Ordering::SeqCst)),
                self.front.opts.shutdown_grace.as_secs_f64()
            );
        }
        self.shutdown();
        match self.front.engine_error.lock().unwrap().clone() {
            Some(e) => Err(anyhow!("the engine stopped: {e}")),
            None => Ok(()),
        }
    }

    /// Stops accepting, lets requests in flight finish (within the grace period), and joins
    /// the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(runtime) = self.runtime.take() else { return };
        let _ = self.shutdown.send(true);
        if let Some(mut accept) = self.accept.take() {
            // The accept loop returns once the connections have wound down. Past the grace
            // period the requests still open are answered 503 (their samples cancelled) and
            // get a moment to be written; then the runtime is dropped, with what is left.
            let front = &self.front;
            runtime.block_on(async {
                if tokio::time::timeout(front.opts.shutdown_grace, &mut accept).await.is_err() {
                    eprintln!(
                        "bsa serve: the shutdown grace of {} s has passed; cancelling {} still queued or running (their clients get 503 shutting_down)",
                        front.opts.shutdown_grace.as_secs_f64(),
                        samples(front.stats.queued_samples.load(Ordering::SeqCst))
                    );
                    front.past_grace.send_replace(true);
                    let _ = tokio::time::timeout(Duration::from_secs(5), &mut accept).await;
                }
            });
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
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

/// "1 sample", "2 samples".
fn samples(n: usize) -> String {
    format!("{n} sample{}", if n == 1 { "" } else { "s" })
}

/// `bsa serve`: starts the server, prints where it listens, serves until SIGINT/SIGTERM.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let server = Server::start(opts).context("starting bsa serve")?;
    // Tests and scripts read this line to learn the port (with --port 0).
    println!("bsa serve: {} listening on http://{}/v1", server.model_name(), server.addr());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.wait()
}
