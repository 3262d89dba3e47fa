//! `bsa bench serve`: requests/s and tokens/s of an in-process `bsa serve` at several
//! numbers of concurrent clients, through the real HTTP client, each client keeping one
//! connection alive for all its requests (as the `openai` SDK and most harnesses do).

use std::sync::atomic::Ordering;

use anyhow::{anyhow, Result};

use bsa::prompt::Message;
use bsa::serve::{ServeOptions, Server};

/// One measurement of [`bench`].
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub clients: usize,
    pub requests: usize,
    pub seconds: f64,
    pub completion_tokens: usize,
    /// Decode tokens per decode step during the measurement.
    pub mean_decode_batch: f64,
    /// Connections the server accepted during the measurement (one per client when they
    /// are kept alive).
    pub connections: usize,
}

impl std::fmt::Display for BenchRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:3} clients: {:4} requests in {:7.2} s: {:7.2} req/s, {:8.1} completion tok/s, mean decode batch {:5.1} ({:.2} x clients), {} connections",
            self.clients,
            self.requests,
            self.seconds,
            self.requests as f64 / self.seconds.max(1e-9),
            self.completion_tokens as f64 / self.seconds.max(1e-9),
            self.mean_decode_batch,
            self.mean_decode_batch / self.clients as f64,
            self.connections
        )
    }
}

/// `bsa bench serve`: an in-process server on 127.0.0.1:0 and, for each entry of
/// `clients`, that many threads sending `per_client` requests each through the HTTP client,
/// one after another on one kept-alive connection (the data's queries in turn,
/// `temperature`, `max_tokens`, end-of-sequence ignored so every sample runs `max_tokens`:
/// the batch then measures how many clients the server serves at once, not how long their
/// answers happen to be).
#[allow(clippy::too_many_arguments)]
pub fn bench(model: &str, device: &str, data: &str, kv_cache_mb: usize, clients: &[usize], per_client: usize, max_tokens: usize, temperature: f32) -> Result<Vec<BenchRow>> {
    use bsa::backends::openai::{ChatRequest, Client, ClientOptions, Endpoint};
    let queries: Vec<String> = bsa::data::Dataset::load(data)?.items.into_iter().map(|i| i.query).collect();
    anyhow::ensure!(!queries.is_empty(), "{data} has no items to use as prompts");
    let most = clients.iter().copied().max().unwrap_or(1);
    let server = Server::start(ServeOptions {
        model: model.to_string(),
        port: 0,
        device: device.to_string(),
        cache: bsa::backends::local::CacheSizing { kv_cache_mb: Some(kv_cache_mb), ..Default::default() },
        batch_size: most.max(1),
        max_queue: most.max(1) * 4,
        max_tokens,
        ..Default::default()
    })?;
    let endpoint = Endpoint::parse(&format!("openai:{}@http://{}/v1", server.model_name(), server.addr()), "bench")?;
    let stats = server.stats();
    let mut rows = Vec::new();
    for &c in clients {
        let (steps0, toks0, conns0) = (stats.decode_steps.load(Ordering::Relaxed), stats.decode_tokens.load(Ordering::Relaxed), stats.accepted_connections.load(Ordering::Relaxed));
        let start = std::time::Instant::now();
        let tokens: Result<Vec<usize>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..c)
                .map(|client| {
                    let (endpoint, queries) = (endpoint.clone(), &queries);
                    scope.spawn(move || -> Result<usize> {
                        let http = Client::new(endpoint, ClientOptions { concurrency: 1, ..Default::default() })?;
                        let mut tokens = 0;
                        for r in 0..per_client {
                            let q = &queries[(client * per_client + r) % queries.len()];
                            let mut req = ChatRequest { messages: vec![Message::user(q.clone())], n: 1, temperature, top_p: 1.0, max_tokens, seed: Some((client * per_client + r) as u64), ..Default::default() };
                            req.extra.insert("ignore_eos".into(), serde_json::Value::Bool(true));
                            tokens += http.chat(&req)?.completion_tokens;
                        }
                        Ok(tokens)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().map_err(|_| anyhow!("a client thread panicked"))?).collect()
        });
        let seconds = start.elapsed().as_secs_f64();
        let steps = stats.decode_steps.load(Ordering::Relaxed) - steps0;
        let toks = stats.decode_tokens.load(Ordering::Relaxed) - toks0;
        let connections = stats.accepted_connections.load(Ordering::Relaxed) - conns0;
        rows.push(BenchRow { clients: c, requests: c * per_client, seconds, completion_tokens: tokens?.iter().sum(), mean_decode_batch: toks as f64 / steps.max(1) as f64, connections });
    }
    server.stop();
    Ok(rows)
}
