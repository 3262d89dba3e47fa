//! A streamed chat completion: server-sent events (`data: {json}` lines, events ended by a
//! blank line) in OpenAI's chunk format. Each chunk's `choices[]` carry deltas by `index`
//! (`delta.content` to the response, `delta.reasoning_content` or `delta.reasoning` to the
//! thinking) and a choice's last one its `finish_reason`; a last chunk with `choices: []`
//! carries the usage, and `data: [DONE]` ends the stream.
//!
//! Lines are split on bytes and an event is decoded as UTF-8 only once whole, so a character
//! cut across two reads (or two HTTP chunks) arrives intact. A stream that ends before
//! `[DONE]`, or with a choice that never got its `finish_reason`, is a failed attempt to be
//! retried like a dropped connection; an `{"error": ...}` event fails the attempt with the
//! server's message (retried unless its code is a 4xx the client caused).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};

use serde_json::Value;

use super::{retryable_status, snippet, usage, ChatChoice, ChatReply, Failure};

/// One event: its `event` field (empty when none) and its `data` lines joined by `\n`.
struct Event {
    kind: String,
    data: Vec<u8>,
}

/// The events of a byte stream (lines end in `\n` or `\r\n`; `:` lines are comments).
struct Events<R> {
    reader: R,
    line: Vec<u8>,
}

impl<R: BufRead> Events<R> {
    /// The next event with data, None at the end of the stream (an event cut off by the end
    /// still counts: some servers end on `data: [DONE]\n` alone).
    fn next(&mut self) -> std::io::Result<Option<Event>> {
        let mut event: Option<Event> = None;
        loop {
            self.line.clear();
            if self.reader.read_until(b'\n', &mut self.line)? == 0 {
                return Ok(event);
            }
            let line = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                if event.is_some() {
                    return Ok(event);
                }
                continue;
            }
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(0) => continue,
                Some(i) => (&line[..i], line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])),
                None => (line, &b""[..]),
            };
            match field {
                b"data" => {
                    let e = event.get_or_insert_with(|| Event { kind: String::new(), data: Vec::new() });
                    if !e.data.is_empty() {
                        e.data.push(b'\n');
                    }
                    e.data.extend_from_slice(value);
                }
                b"event" => event.get_or_insert_with(|| Event { kind: String::new(), data: Vec::new() }).kind = String::from_utf8_lossy(value).into_owned(),
                _ => {}
            }
        }
    }
}

/// Reads a streamed reply to its `[DONE]` (and the body to its end, so the connection goes
/// back to the pool).
pub(super) fn read(body: impl Read) -> Result<ChatReply, Failure> {
    let mut events = Events { reader: BufReader::new(body), line: Vec::new() };
    let mut choices: BTreeMap<u64, ChatChoice> = BTreeMap::new();
    let mut tokens = (0, 0);
    loop {
        let event = match events.next() {
            Ok(Some(e)) => e,
            Ok(None) => return Err(Failure::retryable("the event stream ended before data: [DONE]".into())),
            Err(e) => return Err(Failure::retryable(format!("reading the event stream: {e}"))),
        };
        if event.data == b"[DONE]" {
            break;
        }
        let Ok(text) = std::str::from_utf8(&event.data) else {
            return Err(Failure::retryable("the event stream sent data that is not UTF-8".into()));
        };
        if text.trim().is_empty() {
            continue;
        }
        let chunk: Value = serde_json::from_str(text).map_err(|_| Failure::retryable(format!("the event stream sent data that is not JSON: {}", snippet(text))))?;
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()).or((event.kind == "error").then_some(&chunk)) {
            return Err(error_event(error));
        }
        if chunk.get("usage").is_some_and(Value::is_object) {
            tokens = usage(chunk.get("usage"));
        }
        let list = match chunk.get("choices") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(list)) => list,
            Some(_) => return Err(Failure::retryable(format!("the event stream sent a chunk whose choices are not a list: {}", snippet(text)))),
        };
        for c in list {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let choice = choices.entry(index).or_insert_with(|| ChatChoice { content: String::new(), reasoning: None, finish_reason: None, error: None });
            if let Some(delta) = c.get("delta").filter(|d| d.is_object()) {
                // A server may send the thinking under both names; one is the thinking.
                let reasoning = ["reasoning_content", "reasoning"].iter().find_map(|k| delta.get(*k).and_then(Value::as_str));
                if let Some(r) = reasoning {
                    choice.reasoning.get_or_insert_with(String::new).push_str(r);
                }
                choice.add_content(delta.get("content"));
            }
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                choice.finish_reason = Some(f.to_string());
            }
        }
    }
    // The reply is whole; what follows [DONE] is only the body's end.
    let _ = std::io::copy(&mut events.reader, &mut std::io::sink());
    if choices.is_empty() {
        return Err(Failure::retryable("the event stream ended without a choice".into()));
    }
    if let Some(i) = choices.iter().find(|(_, c)| c.finish_reason.is_none()).map(|(i, _)| i) {
        return Err(Failure::retryable(format!("the event stream ended without a finish_reason for choice {i}")));
    }
    Ok(ChatReply { choices: choices.into_values().collect(), prompt_tokens: tokens.0, completion_tokens: tokens.1 })
}

/// The failure an error event stands for: its message, retried unless its code is a status
/// the client caused.
fn error_event(error: &Value) -> Failure {
    let message = error.get("message").and_then(Value::as_str).map_or_else(|| snippet(&error.to_string()), str::to_string);
    let status = error.get("code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok()).filter(|c| (400..600).contains(c));
    Failure {
        message: format!("the event stream sent an error: {message}"),
        retry: status.is_none_or(retryable_status),
        retry_after: None,
        status,
        error: Some(error.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(s: &str) -> Result<ChatReply, String> {
        read(s.as_bytes()).map_err(|f| f.message)
    }

    #[test]
    fn events_join_data_lines_skip_comments_and_tolerate_crlf() {
        let mut e = Events { reader: &b": ping\r\nevent: x\r\ndata: a\r\ndata:b\r\n\r\n\ndata: [DONE]"[..], line: Vec::new() };
        let first = e.next().unwrap().unwrap();
        assert_eq!((first.kind.as_str(), first.data.as_slice()), ("x", &b"a\nb"[..]));
        assert_eq!(e.next().unwrap().unwrap().data, b"[DONE]");
        assert!(e.next().unwrap().is_none());
    }

    #[test]
    fn chunks_accumulate_by_index_with_nulls_and_usage() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":1,\"delta\":{\"role\":\"assistant\",\"content\":null,\"reasoning_content\":\"B\"},\"finish_reason\":null}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning\":\"A\",\"content\":\"x\"},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"y\"},\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4}}\n\n",
            "data: [DONE]\n\n",
        );
        let r = read_str(body).unwrap();
        let got: Vec<_> = r.choices.iter().map(|c| (c.reasoning.as_deref(), c.content.as_str(), c.finish_reason.as_deref())).collect();
        assert_eq!(got, [(Some("A"), "x", Some("stop")), (Some("B"), "y", Some("length"))]);
        assert_eq!((r.prompt_tokens, r.completion_tokens), (5, 4));
    }

    #[test]
    fn a_cut_stream_or_an_error_event_fails() {
        let open = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\n";
        assert!(read_str(open).unwrap_err().contains("before data: [DONE]"));
        let unfinished = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n";
        assert!(read_str(unfinished).unwrap_err().contains("finish_reason for choice 0"));
        let f = read("data: {\"error\":{\"message\":\"prompt too long\",\"code\":400}}\n\n".as_bytes()).unwrap_err();
        assert!(f.message.contains("prompt too long") && !f.retry && f.status == Some(400), "{}", f.message);
        let f = read("event: error\ndata: {\"message\":\"engine died\"}\n\n".as_bytes()).unwrap_err();
        assert!(f.message.contains("engine died") && f.retry, "{}", f.message);
    }
}
