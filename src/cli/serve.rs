//! `bsa serve`: the local engine behind an OpenAI-compatible HTTP API.

use anyhow::Result;
use clap::Args;

use super::args::{positive, positive_u32, EngineArgs};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A .gguf file, a model directory, a preset or a hub id (as for generate).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// The name clients send as `model` (default: a model file's stem, else the preset name
    /// or hub id; the --model argument as given is accepted too).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// A Jinja chat template file to use instead of the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<std::path::PathBuf>,
    /// The address to listen on (0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free port, printed on start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request but /health.
    #[arg(long, value_name = "KEY", env = "BSA_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub batch_size: usize,
    /// Most prompt tokens prefilled per step.
    #[arg(long, default_value_t = 512, value_parser = positive)]
    pub prefill_chunk: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Most samples queued or decoding at once; requests beyond it get 429 (retry later).
    #[arg(long, default_value_t = 256, value_parser = positive)]
    pub max_queue: usize,
    /// Most samples per request (n).
    #[arg(long, default_value_t = 16, value_parser = positive_u32)]
    pub max_n: u32,
    /// Most new tokens per sample (max_tokens), also the default when a request has none.
    #[arg(long, default_value_t = 4096, value_parser = positive)]
    pub max_tokens: usize,
    /// Largest request body, in MiB (413 beyond).
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub max_body_mb: usize,
    /// Most request-body MiB being read or tokenized at once (503 beyond): bounds the memory
    /// a flood of large requests takes. At least --max-body-mb.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub max_inflight_mb: usize,
    /// Most open connections (503 beyond).
    #[arg(long, default_value_t = 1024, value_parser = positive)]
    pub max_connections: usize,
    /// Seconds a client may take to send a request's headers, and a kept-alive connection may
    /// sit idle (408 for a first request that is too slow).
    #[arg(long, default_value_t = 30, value_parser = positive, value_name = "SECONDS")]
    pub header_timeout: usize,
    /// Seconds a client may take to send a request's body (408).
    #[arg(long, default_value_t = 30, value_parser = positive, value_name = "SECONDS")]
    pub body_timeout: usize,
    /// On SIGINT/SIGTERM: seconds requests in flight get to finish before they are cancelled.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub shutdown_grace: u64,
}

pub(super) fn run(a: ServeArgs) -> Result<()> {
    bsa::serve::serve(bsa::serve::ServeOptions {
        model: a.model,
        served_model_name: a.served_model_name,
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        device: a.engine.device.clone(),
        dtype: a.engine.dtype.clone(),
        batch_size: a.batch_size,
        prefill_chunk: a.prefill_chunk,
        chat_template: a.chat_template,
        cache: a.engine.cache_sizing(16),
        prefix_cache: !a.engine.no_prefix_cache,
        max_queue: a.max_queue,
        max_n: a.max_n,
        max_tokens: a.max_tokens,
        max_body_bytes: a.max_body_mb << 20,
        max_inflight_bytes: a.max_inflight_mb << 20,
        max_connections: a.max_connections,
        header_timeout: std::time::Duration::from_secs(a.header_timeout as u64),
        body_timeout: std::time::Duration::from_secs(a.body_timeout as u64),
        shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
    })
}
