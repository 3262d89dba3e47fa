//! The OpenAI chat completions protocol as `bsa serve` speaks it: the request's fields
//! (checked, with a 400 naming the field for anything wrong or unsupported), the reply, and
//! the chunks of a streamed reply.
//!
//! Sources: OpenAI's API reference (chat completions, the chunk object, error objects) and
//! vLLM's extensions (`top_k`, `min_p`, `ignore_eos`, `chat_template_kwargs`,
//! `reasoning_content`).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::stream::Delta;
use super::Frontend;
use crate::engine::constraint::Grammar;
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{self, Finished, TokenLogprob};
use crate::engine::tokenizer::encode_prompt;
use crate::prompt::Message;

/// An HTTP error in the OpenAI shape (`{"error": {message, type, param, code}}`).
#[derive(Debug)]
pub(super) struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub message: String,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
    /// `x-should-retry: false` (honoured by the `openai` SDK): retrying cannot help.
    pub no_retry: bool,
}

impl ApiError {
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", code: None, param: param.map(str::to_string), message: message.into(), retry_after: None, no_retry: false }
    }

    pub fn new(status: u16, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, code: Some(code), param: None, message: message.into(), retry_after: None, no_retry: false }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The request fields the server reads. Everything else must be absent, null or one of the
/// neutral values in [`neutral`]: a field the server would ignore gets a 400 naming it.
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
    /// OpenAI's newer name for max_tokens (the only one its reasoning models take).
    max_completion_tokens: Option<i64>,
    seed: Option<i64>,
    stop: Option<StopField>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    response_format: Option<Value>,
    /// vLLM's extension: end-of-sequence tokens do not end a sample.
    ignore_eos: Option<bool>,
    /// Variables for the chat template (vLLM's extension), e.g. `{"enable_thinking": false}`.
    chat_template_kwargs: Option<Map<String, Value>>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
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

/// Fields read by [`ChatBody`].
const READ: &[&str] = &[
    "model", "messages", "n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "seed", "stop", "stream", "stream_options", "response_format", "ignore_eos",
    "chat_template_kwargs", "logprobs", "top_logprobs",
];

/// Fields that change nothing the server computes: end-user ids and metadata for the
/// caller's own records (OpenAI stores them; a local server has nothing to do with them).
const METADATA: &[&str] = &["user", "metadata", "parallel_tool_calls"];

/// Whether an unsupported field has the value that asks for nothing (a penalty of 0, no
/// tools, no logit bias), which clients often send explicitly.
fn neutral(field: &str, v: &Value) -> bool {
    match field {
        "presence_penalty" | "frequency_penalty" => v.as_f64() == Some(0.0),
        "repetition_penalty" => v.as_f64() == Some(1.0),
        "logit_bias" => v.as_object().is_some_and(Map::is_empty),
        "tools" | "functions" => v.as_array().is_some_and(Vec::is_empty),
        "tool_choice" | "function_call" => v.as_str() == Some("none"),
        "store" => v.as_bool() == Some(false),
        "echo" => v.as_bool() == Some(false),
        "skip_special_tokens" => v.as_bool() == Some(true),
        _ => false,
    }
}

/// Template variables the server sets from the request itself.
const RESERVED_TEMPLATE_VARIABLES: &[&str] = &["messages", "add_generation_prompt", "bos_token", "eos_token"];

/// A checked request, its prompt tokenized, ready to be admitted.
pub(super) struct Prepared {
    pub model: String,
    pub prompt: Vec<u32>,
    pub n: usize,
    pub params: SamplingParams,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub grammar: Option<Arc<Grammar>>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// `logprobs` asked for, with this many `top_logprobs`.
    pub logprobs: Option<usize>,
}

/// Most `top_logprobs` (OpenAI's limit).
const MAX_TOP_LOGPROBS: usize = 20;

/// Reads and checks a request body, renders its messages with the chat template and
/// tokenizes them. CPU work: run it off the async threads. The prompt's length is checked
/// against the context from its byte length first, so an oversized prompt is refused
/// without being tokenized in full.
pub(super) fn prepare(front: &Frontend, raw: &[u8]) -> Result<Prepared, ApiError> {
    let mut fields: Map<String, Value> = match serde_json::from_slice(raw) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(ApiError::bad(None, "the body must be a JSON object (a chat completion request)")),
        Err(e) => return Err(ApiError::bad(None, format!("the body is not valid JSON: {e}"))),
    };
    // Explicit nulls mean "not given", as OpenAI's own server reads them.
    fields.retain(|_, v| !v.is_null());
    for (k, v) in &fields {
        if !READ.contains(&k.as_str()) && !METADATA.contains(&k.as_str()) && !neutral(k, v) {
            return Err(ApiError {
                code: Some("unsupported_parameter"),
                ..ApiError::bad(Some(k), format!("unsupported parameter {k:?} = {v}: this server does not implement it; leave it out (or send null)"))
            });
        }
    }
    fields.retain(|k, _| READ.contains(&k.as_str()));
    // For the message should `stop` not parse (untagged enums say nothing useful).
    let stop_given = fields.get("stop").map(Value::to_string).unwrap_or_default();
    let body: ChatBody = serde_path_to_error::deserialize(Value::Object(fields)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        // A missing field is reported at the top level: name it from the message.
        let missing = inner.strip_prefix("missing field `").and_then(|m| m.split('`').next()).map(str::to_string);
        let field = missing.clone().unwrap_or_else(|| path.split(['.', '[']).next().unwrap_or("").to_string());
        let message = match (&missing, field.as_str()) {
            (Some(m), _) => format!("{m} is required"),
            (None, "stop") => format!("stop must be a string or a list of strings, not {stop_given}"),
            _ => format!("{path}: {inner}"),
        };
        ApiError::bad((!field.is_empty() && field != ".").then_some(field.as_str()), message)
    })?;
    if !front.names.contains(&body.model) {
        return Err(ApiError {
            status: 404,
            code: Some("model_not_found"),
            ..ApiError::bad(Some("model"), format!("the model {:?} is not served here; {}", body.model, served_names(front)))
        });
    }
    let stream = body.stream.unwrap_or(false);
    if body.stream_options.is_some() && !stream {
        return Err(ApiError::bad(Some("stream_options"), "stream_options is only allowed with stream: true"));
    }
    let logprobs = match (body.logprobs.unwrap_or(false), body.top_logprobs) {
        (false, None) => None,
        (false, Some(_)) => return Err(ApiError::bad(Some("top_logprobs"), "top_logprobs needs logprobs: true")),
        (true, None) => Some(0),
        (true, Some(k)) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        (true, Some(k)) => return Err(ApiError::bad(Some("top_logprobs"), format!("top_logprobs = {k} is out of range: 0 to {MAX_TOP_LOGPROBS}"))),
    };
    if body.messages.is_empty() {
        return Err(ApiError::bad(Some("messages"), "messages is empty; send at least one user message"));
    }
    let opts = &front.opts;
    let n = body.n.unwrap_or(1);
    if n < 1 || n > opts.max_n as i64 {
        return Err(ApiError::bad(Some("n"), format!("n = {n} is out of range: 1 to {} (--max-n)", opts.max_n)));
    }
    let n = n as usize;
    if n > opts.max_queue {
        // It could never be admitted, however long the client waited.
        return Err(ApiError::bad(Some("n"), format!("n = {n} is more samples than this server ever holds at once ({}, --max-queue); send at most {} per request", opts.max_queue, opts.max_queue)));
    }
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
    let (max_field, max_value) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(t), _) => ("max_completion_tokens", Some(t)),
        (None, t) => ("max_tokens", t),
    };
    if let Some(t) = max_value {
        if t < 1 || t > opts.max_tokens as i64 {
            return Err(ApiError::bad(Some(max_field), format!("{max_field} = {t} is out of range: 1 to {} (--max-tokens)", opts.max_tokens)));
        }
    }
    let stop = match body.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.iter().any(String::is_empty) || stop.len() > 16 {
        return Err(ApiError::bad(Some("stop"), "stop takes up to 16 non-empty strings"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    let mut content_bytes = 0;
    for (i, m) in body.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
            return Err(ApiError::bad(Some("messages"), format!("messages[{i}].role {:?}: use system, user or assistant", m.role)));
        }
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        if m.content.is_null() && role != "assistant" {
            return Err(ApiError::bad(Some("messages"), format!("messages[{i}] ({}) has no content; give it a string", m.role)));
        }
        let text = content_text(&m.content).ok_or_else(|| ApiError::bad(Some("messages"), format!("messages[{i}].content must be a string or a list of text parts")))?;
        content_bytes += text.len();
        messages.push(Message::new(role, text));
    }
    let too_long = |what: String| ApiError { code: Some("context_length_exceeded"), ..ApiError::bad(Some("messages"), what) };
    // More bytes than the context's tokens can spell: refused before rendering or tokenizing.
    let byte_limit = front.max_model_len.saturating_mul(front.max_bytes_per_token);
    if content_bytes > byte_limit {
        return Err(too_long(format!(
            "the messages have {content_bytes} bytes, more than {} tokens (the most one sequence may have) can spell ({byte_limit} bytes); shorten them",
            front.max_model_len
        )));
    }
    let mut kwargs = body.chat_template_kwargs.unwrap_or_default();
    if let Some(k) = kwargs.keys().find(|k| RESERVED_TEMPLATE_VARIABLES.contains(&k.as_str())) {
        return Err(ApiError::bad(Some("chat_template_kwargs"), format!("chat_template_kwargs.{k}: the server sets {k} itself; leave it out")));
    }
    let enable_thinking = match kwargs.remove("enable_thinking") {
        None | Some(Value::Null) => front.prompter.enable_thinking(),
        Some(Value::Bool(b)) => Some(b),
        Some(v) => return Err(ApiError::bad(Some("chat_template_kwargs"), format!("chat_template_kwargs.enable_thinking = {v}: use true or false"))),
    };
    let text = front.prompter.render_messages_with(&messages, enable_thinking, kwargs).map_err(|e| ApiError::bad(Some("messages"), format!("the chat template refused the messages: {e:#}")))?;
    if text.len() > byte_limit {
        return Err(too_long(format!("the rendered prompt has {} bytes, more than {} tokens can spell; shorten the messages", text.len(), front.max_model_len)));
    }
    // Tokenizing costs far more memory than the text (a 3.7 MB prompt took 4 GB at once):
    // a long text is first counted in pieces, and refused as soon as the count is over.
    if let Some(tokens) = tokens_over(&front.tokenizer, &text, front.max_model_len) {
        return Err(too_long(format!("the prompt has over {tokens} tokens, more than the {} one sequence may have; shorten the messages", front.max_model_len)));
    }
    let prompt = encode_prompt(&front.tokenizer, front.bos.as_ref().map(|(id, t)| (*id, t.as_str())), &text).map_err(|e| ApiError::bad(Some("messages"), format!("{e:#}")))?;
    let room = front.max_model_len.saturating_sub(prompt.len());
    let max_tokens = max_value.map_or(opts.max_tokens.min(room.max(1)), |t| t as usize);
    // As vLLM does: a request that cannot reach its max_tokens under the length limit is
    // refused rather than cut short.
    if prompt.len() + max_tokens > front.max_model_len {
        return Err(too_long(format!(
            "the prompt ({} tokens) plus {max_field} ({max_tokens}) is over the {} tokens this server can hold for one sequence; shorten the messages or lower {max_field}",
            prompt.len(),
            front.max_model_len
        )));
    }
    let grammar = response_format_grammar(front, body.response_format.as_ref())?;
    Ok(Prepared {
        model: body.model,
        prompt,
        n,
        params,
        seed: body.seed.map(|s| s as u64),
        max_tokens,
        stop,
        grammar,
        ignore_eos: body.ignore_eos.unwrap_or(false),
        stream,
        include_usage: body.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        logprobs,
    })
}

/// Bytes of text tokenized at once when counting a long prompt.
const COUNT_PIECE_BYTES: usize = 64 << 10;

/// Some(a lower bound over `limit`) when `text` has more than `limit` tokens, found by
/// tokenizing it in pieces of about [`COUNT_PIECE_BYTES`] (cut before a whitespace, where
/// pre-tokenizers split anyway) and stopping once the count is over; None when it may fit.
/// Each cut can merge at most one token away, so a piece counts one less than it tokenizes
/// to. A text of one piece is left to the full tokenization.
fn tokens_over(tokenizer: &tokenizers::Tokenizer, text: &str, limit: usize) -> Option<usize> {
    if text.len() <= COUNT_PIECE_BYTES {
        return None;
    }
    let mut counted = 0usize;
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(COUNT_PIECE_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut < rest.len() {
            if let Some(ws) = rest[..cut].rfind(char::is_whitespace).filter(|&w| w > 0) {
                cut = ws;
            }
        }
        let n = tokenizer.encode(&rest[..cut], false).map(|e| e.len()).unwrap_or(0);
        counted += n.saturating_sub(1);
        if counted > limit {
            return Some(counted);
        }
        rest = &rest[cut..];
    }
    None
}

/// The grammar of a request's `response_format`: none for `text` (or no field), any JSON
/// object for `json_object`, the schema of `json_schema` (`{"json_schema": {"schema": ...}}`),
/// decoded under llguidance like a local judge's labels.
fn response_format_grammar(front: &Frontend, format: Option<&Value>) -> Result<Option<Arc<Grammar>>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else { return Ok(None) };
    let bad = |m: String| ApiError::bad(Some("response_format"), m);
    let schema = match format.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => json!({"type": "object"}),
        Some("json_schema") => format
            .get("json_schema")
            .and_then(|j| j.get("schema"))
            .cloned()
            .ok_or_else(|| bad("response_format of type json_schema needs json_schema.schema".into()))?,
        Some(other) => return Err(bad(format!("response_format type {other:?} is not supported; use text, json_object or json_schema"))),
        None => return Err(bad(format!("response_format = {format} has no type; send {{\"type\": \"json_schema\", \"json_schema\": {{\"schema\": ...}}}}, json_object or text"))),
    };
    let (vocab_size, eos) = front.grammar_vocab;
    let compiler = front
        .grammars
        .get_or_init(|| crate::engine::constraint::GrammarCompiler::new(&front.tokenizer, vocab_size, eos).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| bad(format!("this model's tokenizer does not support structured output: {e}")))?;
    compiler.compile_json_schema(&schema).map(Some).map_err(|e| bad(format!("response_format: {e:#}")))
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

/// The OpenAI protocol's `finish_reason`: a stop string is a "stop" there.
pub(super) fn finish_reason(f: scheduler::FinishReason) -> &'static str {
    match f {
        scheduler::FinishReason::Stop | scheduler::FinishReason::StopString | scheduler::FinishReason::GrammarComplete => "stop",
        scheduler::FinishReason::Length => "length",
        // Not in OpenAI's list; vLLM reports an engine error as "error".
        scheduler::FinishReason::Error => "error",
    }
}

/// `usage` of a reply.
pub(super) fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// "this server has "NAME" (also accepted: "ALIAS", ...)": what an unknown model's error says.
pub(super) fn served_names(front: &Frontend) -> String {
    let also: Vec<String> = front.names[1..].iter().map(|n| format!("{n:?}")).collect();
    let also = if also.is_empty() { String::new() } else { format!(" (also accepted: {})", also.join(", ")) };
    format!("this server has {:?}{also}", front.names[0])
}

/// The body of a (non-streamed) chat completion.
pub(super) fn completion_body(front: &Frontend, id: &str, created: u64, model: &str, prompt_tokens: usize, choices: Vec<(Delta, &Finished)>) -> Value {
    let mut completion_tokens = 0;
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, (text, f))| {
            completion_tokens += f.tokens.len();
            let thinking = (!text.thinking.is_empty()).then_some(text.thinking);
            json!({
                "index": i,
                "message": {"role": "assistant", "content": text.response, "reasoning_content": thinking, "reasoning": thinking},
                "finish_reason": finish_reason(f.finish),
                "logprobs": f.logprobs.as_ref().map(|l| logprobs_content(front, l)),
            })
        })
        .collect();
    json!({"id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})
}

/// One `chat.completion.chunk` of a streamed reply: `choices` as given, and `usage: null`
/// when the client asked for usage (the last chunk then carries it, with no choices).
pub(super) fn chunk(id: &str, created: u64, model: &str, choices: Vec<Value>, include_usage: bool) -> Value {
    let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
    if include_usage {
        c["usage"] = Value::Null;
    }
    c
}

/// A choice of a chunk: its delta (role, reasoning_content, content as present), the
/// log-probabilities of the tokens it carries (when asked for) and its finish reason.
pub(super) fn chunk_choice(index: usize, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
    json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
}

/// OpenAI's `logprobs` object of a choice: `{"content": [{token, logprob, bytes,
/// top_logprobs: [{token, logprob, bytes}]}]}`. `bytes` are the token's own bytes (see
/// [`token_bytes`]) and `token` their text, invalid UTF-8 replaced by U+FFFD: a byte-level
/// token that is part of a character is a U+FFFD in `token` and its true byte in `bytes`,
/// so the `bytes` of the tokens put together are the completion's text.
pub(super) fn logprobs_content(front: &Frontend, lps: &[TokenLogprob]) -> Value {
    let table = front.token_bytes.get_or_init(|| token_bytes(&front.tokenizer));
    let entry = |id: u32, logprob: f32| {
        let bytes = match table.as_ref().and_then(|t| t.get(id as usize)).filter(|b| !b.is_empty()) {
            Some(b) => b.clone(),
            None => front.tokenizer.decode(&[id], false).unwrap_or_default().into_bytes(),
        };
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
            e
        })
        .collect();
    json!({"content": content})
}

/// Every token's bytes, by id ([`crate::engine::constraint::vocabulary_bytes`]), a special
/// token being its text; None for a tokenizer that is neither byte-level BPE nor byte
/// fallback (its tokens are then decoded one by one).
pub(super) fn token_bytes(tokenizer: &tokenizers::Tokenizer) -> Option<Vec<Vec<u8>>> {
    let mut table = crate::engine::constraint::vocabulary_bytes(tokenizer).ok()?;
    for t in &mut table {
        if t.first() == Some(&llguidance::toktrie::TokTrie::SPECIAL_TOKEN_MARKER) {
            t.remove(0);
        }
    }
    Some(table)
}

/// The delta of a text update: `reasoning_content` and `content`, each when non-empty.
pub(super) fn text_delta(d: &Delta) -> Value {
    let mut v = Map::new();
    if !d.thinking.is_empty() {
        v.insert("reasoning_content".into(), Value::String(d.thinking.clone()));
    }
    if !d.response.is_empty() {
        v.insert("content".into(), Value::String(d.response.clone()));
    }
    Value::Object(v)
}
