//! The HTTP side of `bsa serve`: connections (hyper's HTTP/1.1, kept alive and served
//! concurrently on a small tokio runtime), routes (axum), admission, and turning the
//! engine's events into a reply or a stream of server-sent events.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{Event, Job};
use super::protocol::{self, ApiError, Prepared};
use super::stream::{self, ChoiceText};
use super::Frontend;
use crate::engine::sampler::StreamKey;
use crate::engine::scheduler::{self, Finished};

/// Accepts connections until `shutdown` turns true, then waits for the open ones to finish
/// what they are doing (hyper's graceful shutdown: requests in flight complete, idle
/// kept-alive connections close).
pub(super) async fn accept_loop(listener: tokio::net::TcpListener, front: Arc<Frontend>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let router = routes(front.clone());
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors and the like: wait a moment rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let stats = &front.stats;
        stats.accepted_connections.fetch_add(1, Ordering::Relaxed);
        if stats.open_connections.fetch_add(1, Ordering::SeqCst) >= front.opts.max_connections {
            stats.open_connections.fetch_sub(1, Ordering::SeqCst);
            stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
            let e = ApiError { retry_after: Some(1), ..ApiError::new(503, "server_error", "server_busy", "too many open connections; retry shortly") };
            tokio::spawn(write_raw_error(stream, e));
            continue;
        }
        let (front, router, watcher) = (front.clone(), router.clone(), graceful.watcher());
        tokio::spawn(async move {
            serve_connection(stream, &front, router, watcher).await;
            front.stats.open_connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn serve_connection(mut stream: TcpStream, front: &Frontend, router: Router, watcher: hyper_util::server::graceful::Watcher) {
    // The first request's head is read here, so that a client too slow to send it gets a
    // 408 and a garbage request line a 400 with an error body (hyper would close the first
    // silently and answer the second with an empty body). Later requests on the connection
    // are hyper's: its header timeout closes a connection idle that long.
    let head = match read_head(&mut stream, front.opts.header_timeout).await {
        Ok(head) => head,
        Err(Some(e)) => return write_raw_error(stream, e).await,
        Err(None) => return,
    };
    let io = hyper_util::rt::TokioIo::new(Prefixed { prefix: head, at: 0, inner: stream });
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(front.opts.header_timeout).keep_alive(true);
    let _ = watcher.watch(builder.serve_connection(io, service)).await;
}

/// Most bytes of a request head (request line and headers).
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Reads a connection's first request head (through the blank line) within `timeout`.
/// Err(None): the client closed the connection before sending one.
async fn read_head(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, Option<ApiError>> {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.map_err(|_| None)?;
            if n == 0 {
                return Err(None);
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(line_end) = head.windows(2).position(|w| w == b"\r\n") {
                check_request_line(&head[..line_end]).map_err(Some)?;
            } else if head.len() > 8 << 10 {
                return Err(Some(ApiError::bad(None, "the request line is over 8 KiB or not HTTP")));
            }
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(());
            }
            if head.len() > MAX_HEAD_BYTES {
                return Err(Some(ApiError { status: 431, ..ApiError::bad(None, format!("the request headers are over {MAX_HEAD_BYTES} bytes")) }));
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok(head),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Some(ApiError {
            status: 408,
            code: Some("request_timeout"),
            ..ApiError::bad(None, format!("the request headers did not arrive within {} s", timeout.as_secs_f64()))
        })),
    }
}

/// `METHOD SP TARGET SP HTTP/1.x`.
fn check_request_line(line: &[u8]) -> Result<(), ApiError> {
    let text = std::str::from_utf8(line).unwrap_or("");
    let parts: Vec<&str> = text.split(' ').collect();
    let ok = parts.len() == 3
        && !parts[0].is_empty()
        && parts[0].bytes().all(|b| b.is_ascii_uppercase())
        && !parts[1].is_empty()
        && matches!(parts[2], "HTTP/1.1" | "HTTP/1.0");
    if ok {
        return Ok(());
    }
    let shown: String = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    Err(ApiError::bad(None, format!("malformed HTTP request line {shown:?}: expected e.g. \"POST /v1/chat/completions HTTP/1.1\"")))
}

/// Answers an error on a connection hyper never saw, and closes it.
async fn write_raw_error(mut stream: TcpStream, e: ApiError) {
    let body = e.body().to_string();
    let reason = StatusCode::from_u16(e.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
    let retry = e.retry_after.map(|s| format!("Retry-After: {s}\r\n")).unwrap_or_default();
    let msg = format!("HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}", e.status, body.len());
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(msg.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// A connection with bytes already read from it put back in front.
struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn routes(front: Arc<Frontend>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        // A wildcard: hub ids have a slash in them ("Qwen/Qwen3-8B").
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            error_response(ApiError::new(405, "invalid_request_error", "method_not_allowed", format!("{method} is not allowed on {}", uri.path())))
        })
        .fallback(|uri: axum::http::Uri| async move {
            // What the routes above serve, for the message.
            const ROUTES: [(&str, &str); 4] = [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/{id}"), ("GET", "/health")];
            let path = uri.path();
            let hint = trailing_slash_hint(path, |t| ROUTES.iter().any(|(_, r)| *r == t));
            let all: Vec<String> = ROUTES.iter().map(|(m, r)| format!("{m} {r}")).collect();
            error_response(ApiError::new(404, "invalid_request_error", "not_found", format!("no route {path}{hint}; this server has {}", all.join(", "))))
        })
        .with_state(front)
}

/// " (did you mean X, without the trailing slash?)" when `given` is a known `X` plus
/// trailing slashes, else "".
fn trailing_slash_hint(given: &str, known: impl Fn(&str) -> bool) -> String {
    match given.trim_end_matches('/') {
        t if t != given && known(t) => format!(" (did you mean {t}, without the trailing slash?)"),
        _ => String::new(),
    }
}

fn json_response(status: u16, body: &Value) -> Response {
    let mut r = (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: ApiError) -> Response {
    let mut r = json_response(e.status, &e.body());
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if e.no_retry {
        r.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    }
    r
}

async fn health(State(front): State<Arc<Frontend>>) -> Response {
    let err = front.engine_error.lock().unwrap().clone();
    match err {
        None => json_response(200, &json!({"status": "ok", "model": front.names[0], "stats": front.stats.snapshot()})),
        Some(e) => error_response(ApiError::new(503, "server_error", "engine_stopped", format!("the engine stopped: {e}"))),
    }
}

fn authorize(front: &Frontend, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &front.opts.api_key else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::trim);
    // The scheme is case-insensitive (RFC 9110).
    let token = given.and_then(|g| g.split_once(' ')).filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, t)| t.trim());
    if token == Some(key.as_str()) {
        return Ok(());
    }
    Err(ApiError::new(401, "invalid_request_error", "invalid_api_key", "missing or wrong API key: send Authorization: Bearer KEY"))
}

/// The served model as OpenAI's model object (with vLLM's `max_model_len`).
fn model_object(front: &Frontend) -> Value {
    json!({"id": front.names[0], "object": "model", "created": unix_now(), "owned_by": "bsa", "max_model_len": front.max_model_len})
}

async fn models(State(front): State<Arc<Frontend>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&front, &headers) {
        return error_response(e);
    }
    json_response(200, &json!({"object": "list", "data": [model_object(&front)]}))
}

/// `GET /v1/models/{id}` (the SDK's `models.retrieve`): the served model under any name a
/// request may use for it (its `id` is the served name), else 404 `model_not_found`.
async fn model(State(front): State<Arc<Frontend>>, headers: HeaderMap, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    if let Err(e) = authorize(&front, &headers) {
        return error_response(e);
    }
    if front.names.contains(&id) {
        return json_response(200, &model_object(&front));
    }
    let hint = trailing_slash_hint(&id, |t| front.names.iter().any(|n| n == t));
    error_response(ApiError::new(404, "invalid_request_error", "model_not_found", format!("the model {id:?} is not served here{hint}; {}", protocol::served_names(&front))))
}

async fn chat(State(front): State<Arc<Frontend>>, headers: HeaderMap, body: Body) -> Response {
    match chat_reply(front, headers, body).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn chat_reply(front: Arc<Frontend>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    authorize(&front, &headers)?;
    let opts = &front.opts;
    let limit = opts.max_body_bytes;
    let too_large = || ApiError::new(413, "invalid_request_error", "request_too_large", format!("the request body is over {limit} bytes"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // The byte budget is taken before the body is read (a body of unknown length counts as
    // the largest allowed) and held until its prompt is tokenized.
    let kib = declared.unwrap_or(limit).div_ceil(1024).max(1) as u32;
    let Ok(permit) = front.body_budget.clone().try_acquire_many_owned(kib) else {
        front.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
        // Read and drop the body (no memory kept) so the client, still sending it, gets the
        // answer rather than a broken connection.
        discard(body, opts.body_timeout).await;
        return Err(ApiError { retry_after: Some(1), ..ApiError::new(503, "server_error", "server_busy", "too many request bytes are being read at once; retry shortly") });
    };
    let raw = match tokio::time::timeout(opts.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => return Err(ApiError::new(408, "invalid_request_error", "request_timeout", format!("the request body did not arrive within {} s", opts.body_timeout.as_secs_f64()))),
        Ok(Err(e)) if is_length_limit(&e) => return Err(too_large()),
        Ok(Err(e)) => return Err(ApiError::bad(None, format!("reading the request body: {e}"))),
        Ok(Ok(raw)) => raw,
    };
    let prep_front = front.clone();
    let prepared = tokio::task::spawn_blocking(move || protocol::prepare(&prep_front, &raw))
        .await
        .map_err(|e| ApiError::new(500, "server_error", "internal_error", format!("preparing the request failed: {e}")))??;
    drop(permit);
    let job = admit(&front, &prepared)?;
    let (events, cancel) = job;
    let id = format!("chatcmpl-bsa-{}", front.next_id.fetch_add(1, Ordering::Relaxed));
    let created = unix_now();
    let guard = CancelOnDrop { cancel, finished: false };
    if prepared.stream {
        Ok(stream_reply(front, prepared, events, guard, id, created))
    } else {
        whole_reply(&front, &prepared, events, guard, &id, created).await
    }
}

/// Reads a body to its end (or until `timeout`), keeping nothing.
async fn discard(mut body: Body, timeout: Duration) {
    use http_body_util::BodyExt;
    let _ = tokio::time::timeout(timeout, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Admits a prepared request under the queue bound and hands it to the engine.
fn admit(front: &Frontend, p: &Prepared) -> Result<(UnboundedReceiver<Event>, Arc<AtomicBool>), ApiError> {
    let opts = &front.opts;
    let stats = &front.stats;
    let n = p.n;
    stats.drain.lock().unwrap().arrived(std::time::Instant::now(), n);
    let before = stats.queued_samples.fetch_add(n, Ordering::SeqCst);
    if before + n > opts.max_queue {
        stats.queued_samples.fetch_sub(n, Ordering::SeqCst);
        stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
        // When enough samples will have finished for this one to fit, at the engine's pace.
        let mean_max_tokens = stats.queued_max_tokens.load(Ordering::SeqCst) / before.max(1);
        let secs = stats.drain.lock().unwrap().retry_after(std::time::Instant::now(), before, n, opts.max_queue, opts.batch_size.min(before.max(1)), mean_max_tokens);
        return Err(ApiError {
            retry_after: Some(secs),
            ..ApiError::new(429, "rate_limit_error", "server_busy", format!("the server is busy ({before} samples queued or decoding, limit {}); retry after {secs} s", opts.max_queue))
        });
    }
    stats.peak_queued_samples.fetch_max(before + n, Ordering::SeqCst);
    stats.queued_max_tokens.fetch_add(n * p.max_tokens, Ordering::SeqCst);
    let seed = p.seed.unwrap_or_else(|| unix_nanos() ^ front.next_id.load(Ordering::Relaxed) as u64);
    let samples = (0..n).map(|j| (p.params, StreamKey::new(seed, "", j as u32), p.max_tokens)).collect();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job { prompt: p.prompt.clone(), samples, grammar: p.grammar.clone(), stop: p.stop.clone(), ignore_eos: p.ignore_eos, stream: p.stream, logprobs: p.logprobs, cancel: cancel.clone(), events: tx };
    let sent = front.jobs.lock().unwrap().as_ref().map(|jobs| jobs.send(job).is_ok()).unwrap_or(false);
    if !sent {
        stats.queued_samples.fetch_sub(n, Ordering::SeqCst);
        stats.queued_max_tokens.fetch_sub(n * p.max_tokens, Ordering::SeqCst);
        return Err(engine_gone(front));
    }
    Ok((rx, cancel))
}

/// The answer to a request still running when the shutdown grace has passed. Not to be
/// retried at once: the `openai` SDK's automatic retry would only meet a closed port and
/// hide this reason behind a connection error.
fn past_grace() -> ApiError {
    ApiError { no_retry: true, ..ApiError::new(503, "server_error", "shutting_down", "the server is shutting down and its grace period for requests in flight has passed; this request was cancelled: retry on a running server") }
}

/// The next engine event, or Err when the shutdown grace passes first.
async fn next_event(front: &Frontend, events: &mut UnboundedReceiver<Event>) -> Result<Option<Event>, ApiError> {
    let mut past = front.past_grace.subscribe();
    tokio::select! {
        e = events.recv() => Ok(e),
        _ = past.wait_for(|p| *p) => Err(past_grace()),
    }
}

fn engine_gone(front: &Frontend) -> ApiError {
    let why = front.engine_error.lock().unwrap().clone().unwrap_or_else(|| "the server is shutting down".into());
    ApiError::new(503, "server_error", "engine_stopped", format!("the engine is not running: {why}"))
}

/// Cancels a request's samples when its reply is dropped unfinished (the client went away).
struct CancelOnDrop {
    cancel: Arc<AtomicBool>,
    finished: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}

async fn whole_reply(front: &Frontend, p: &Prepared, mut events: UnboundedReceiver<Event>, mut guard: CancelOnDrop, id: &str, created: u64) -> Result<Response, ApiError> {
    let mut done: Vec<Option<Finished>> = (0..p.n).map(|_| None).collect();
    let mut left = p.n;
    while left > 0 {
        // Past the shutdown grace the error returns and `guard`, dropped unfinished, cancels
        // the samples.
        match next_event(front, &mut events).await? {
            Some(Event::Done { choice, finished }) => {
                done[choice] = Some(finished);
                left -= 1;
            }
            Some(Event::Tokens { .. }) => {}
            None => return Err(engine_gone(front)),
        }
    }
    guard.finished = true;
    front.stats.completed_requests.fetch_add(1, Ordering::Relaxed);
    let finished: Vec<Finished> = done.into_iter().map(|f| f.expect("all finished")).collect();
    let choices = finished.iter().map(|f| (stream::answer(&front.tokenizer, &f.tokens, &p.stop, f.finish == scheduler::FinishReason::StopString, front.prompter.think()), f)).collect();
    Ok(json_response(200, &protocol::completion_body(front, id, created, &p.model, p.prompt.len(), choices)))
}

/// A streamed reply: a role chunk per choice, text deltas as tokens decode, each choice's
/// last chunk with its finish reason, the usage chunk when asked for, then `data: [DONE]`.
fn stream_reply(front: Arc<Frontend>, p: Prepared, events: UnboundedReceiver<Event>, guard: CancelOnDrop, id: String, created: u64) -> Response {
    struct St {
        front: Arc<Frontend>,
        events: UnboundedReceiver<Event>,
        guard: CancelOnDrop,
        texts: Vec<ChoiceText>,
        /// Log-probabilities sent per choice (None: not asked for).
        logprobs_sent: Option<Vec<usize>>,
        left: usize,
        completion_tokens: usize,
        started: bool,
        ended: bool,
        id: String,
        created: u64,
        model: String,
        prompt_tokens: usize,
        include_usage: bool,
    }
    let texts = (0..p.n).map(|_| ChoiceText::new(front.tokenizer.clone(), p.stop.clone(), front.prompter.think().clone())).collect();
    let logprobs_sent = p.logprobs.map(|_| vec![0; p.n]);
    let st = St { front, events, guard, texts, logprobs_sent, left: p.n, completion_tokens: 0, started: false, ended: false, id, created, model: p.model, prompt_tokens: p.prompt.len(), include_usage: p.include_usage };
    let body = futures_util::stream::unfold(st, |mut st| async move {
        if st.ended {
            return None;
        }
        let mut out = String::new();
        let chunk = |st: &St, choices: Vec<Value>| format!("data: {}\n\n", protocol::chunk(&st.id, st.created, &st.model, choices, st.include_usage));
        if !st.started {
            st.started = true;
            let roles = (0..st.texts.len()).map(|i| protocol::chunk_choice(i, json!({"role": "assistant", "content": ""}), None, None)).collect();
            out.push_str(&chunk(&st, roles));
            return Some((Ok::<Bytes, Infallible>(Bytes::from(out)), st));
        }
        // Everything that has arrived goes out in one write.
        let mut first = true;
        loop {
            let event = if first {
                first = false;
                match next_event(&st.front, &mut st.events).await {
                    Ok(e) => e,
                    Err(e) => {
                        // Past the shutdown grace: an error event, then [DONE] so that a
                        // client reading to the end stops cleanly; the guard cancels.
                        out.push_str(&format!("data: {}\n\ndata: [DONE]\n\n", e.body()));
                        st.ended = true;
                        break;
                    }
                }
            } else {
                match st.events.try_recv() {
                    Ok(e) => Some(e),
                    Err(_) => break,
                }
            };
            match event {
                Some(Event::Tokens { choice, tokens, logprobs }) => {
                    let d = st.texts[choice].push(&tokens);
                    let lp = st.logprobs_sent.as_mut().map(|sent| {
                        sent[choice] += logprobs.len();
                        protocol::logprobs_content(&st.front, &logprobs)
                    });
                    if !d.is_empty() || lp.is_some() {
                        out.push_str(&chunk(&st, vec![protocol::chunk_choice(choice, protocol::text_delta(&d), lp, None)]));
                    }
                }
                Some(Event::Done { choice, finished }) => {
                    st.completion_tokens += finished.tokens.len();
                    let d = st.texts[choice].finish(&finished.tokens, finished.finish == scheduler::FinishReason::StopString);
                    // Tokens of the last step (and none when the sample ended on a token it
                    // does not keep) come with the finish.
                    let lp = match (st.logprobs_sent.as_mut(), finished.logprobs.as_ref()) {
                        (Some(sent), Some(all)) => {
                            let rest = all.get(sent[choice]..).unwrap_or(&[]);
                            sent[choice] = all.len();
                            Some(protocol::logprobs_content(&st.front, rest))
                        }
                        _ => None,
                    };
                    if !d.is_empty() {
                        out.push_str(&chunk(&st, vec![protocol::chunk_choice(choice, protocol::text_delta(&d), None, None)]));
                    }
                    out.push_str(&chunk(&st, vec![protocol::chunk_choice(choice, json!({}), lp, Some(protocol::finish_reason(finished.finish)))]));
                    st.left -= 1;
                    if st.left == 0 {
                        st.guard.finished = true;
                        st.front.stats.completed_requests.fetch_add(1, Ordering::Relaxed);
                        if st.include_usage {
                            let mut u = protocol::chunk(&st.id, st.created, &st.model, Vec::new(), false);
                            u["usage"] = protocol::usage(st.prompt_tokens, st.completion_tokens);
                            out.push_str(&format!("data: {u}\n\n"));
                        }
                        out.push_str("data: [DONE]\n\n");
                        st.ended = true;
                        break;
                    }
                }
                None => {
                    // The engine stopped under this request: say so in the stream, as
                    // OpenAI does for errors mid-stream, and end it without [DONE].
                    let e = engine_gone(&st.front);
                    out.push_str(&format!("data: {}\n\n", e.body()));
                    st.ended = true;
                    break;
                }
            }
        }
        Some((Ok(Bytes::from(out)), st))
    });
    let mut r = Response::new(Body::from_stream(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
