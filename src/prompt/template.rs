//! Rendering a model's own Hugging Face chat template.
//!
//! Every model in the benchmark ships its prompt format as a Jinja template in
//! `tokenizer_config.json`. Re-implementing those formats by hand drifts from
//! what the model was trained on (and what `transformers` produces), so we run
//! the real template with minijinja, set up to behave like the environment
//! `transformers.apply_chat_template` uses:
//!
//! * `trim_blocks` and `lstrip_blocks` on, as in `transformers`; without them
//!   multi-line templates emit stray newlines and indentation.
//! * `{% break %}` / `{% continue %}` (Jinja's loop-controls extension).
//! * Python string/dict methods (`.strip()`, `.split()`, `.startswith()`,
//!   `.items()`, ...) through `minijinja_contrib::pycompat`, since templates are
//!   written against Jinja running inside Python.
//! * `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that
//!   matches Python's `json.dumps` (the template helpers `transformers` adds).
//! * `{% generation %}` blocks (a `transformers` extension that marks assistant
//!   tokens for training masks) are accepted and render their body unchanged.
//! * Python's values and operators where minijinja's differ (see [`super::pyjinja`]):
//!   values print as Python's `str()` (`[1, 'a']`, `{'k': None}`, `(1, 2)`) in `{{ }}`,
//!   `|string`, `|join` and `~`; `'%s' % x` formats strings; `%` on numbers takes the
//!   divisor's sign; `str.rsplit` and the other methods pycompat lacks.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::pyjinja;

const TEMPLATE_NAME: &str = "chat_template";

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Per-render switches passed to the template as context variables.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderOptions {
    /// Append the tokens that open an assistant turn (`add_generation_prompt`).
    pub add_generation_prompt: bool,
    /// Qwen3-style `enable_thinking`. `None` leaves the variable undefined so
    /// the template applies its own default (for Qwen3: thinking on).
    pub enable_thinking: Option<bool>,
    /// Further template variables (e.g. `tools`). They may not reuse the names
    /// set from the fields above or the special tokens.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Where [`with_system`] put the system text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SystemPlacement {
    /// As a `system` message at the start (merged into an existing one).
    SystemMessage,
    /// Prepended to the first user turn, for templates without a system role.
    PrependedToUser,
    /// The system text was empty; the messages are unchanged.
    Skipped,
}

/// Add `system_text` to a conversation. If the template supports a system
/// role it becomes a leading system message (prepended, blank-line separated,
/// to one that is already there); otherwise it is prepended to the first user
/// turn with a blank line between, the usual fallback for templates (e.g.
/// Gemma's) that reject or silently drop system messages. A conversation with
/// no user turn gets a new user message holding the text.
pub fn with_system(
    messages: &[Message],
    system_text: &str,
    template_supports_system: bool,
) -> (Vec<Message>, SystemPlacement) {
    let mut out = messages.to_vec();
    if system_text.trim().is_empty() {
        return (out, SystemPlacement::Skipped);
    }
    if template_supports_system {
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = join_blank_line(system_text, &first.content);
            }
            _ => out.insert(0, Message::system(system_text)),
        }
        return (out, SystemPlacement::SystemMessage);
    }
    match out.iter_mut().find(|m| m.role == "user") {
        Some(user) => user.content = join_blank_line(system_text, &user.content),
        None => out.insert(0, Message::user(system_text)),
    }
    (out, SystemPlacement::PrependedToUser)
}

fn join_blank_line(first: &str, second: &str) -> String {
    if second.is_empty() {
        first.to_string()
    } else {
        format!("{first}\n\n{second}")
    }
}

/// A parsed chat template plus the special tokens it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Parse `source` (the `chat_template` string from `tokenizer_config.json`).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Prompts are plain text: HTML-escaping would corrupt `<|im_start|>`.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        pyjinja::install(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // Replaces minijinja's own `tojson`, which HTML-escapes `<`, `>`, `&`
        // and `'` and writes compact JSON; templates expect Python's output.
        env.add_filter("tojson", tojson);
        let parse_error = |e: Error| anyhow!("chat template failed to parse: {}", describe(&e));
        let source =
            pyjinja::rewrite_operators(&accept_generation_blocks(source)).map_err(parse_error)?;
        env.add_template_owned(TEMPLATE_NAME, source).map_err(parse_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Render `messages` into the prompt string the model sees.
    pub fn render(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        );
        ctx.insert("bos_token".into(), Value::from(self.bos_token.as_str()));
        ctx.insert("eos_token".into(), Value::from(self.eos_token.as_str()));
        if let Some(t) = opts.enable_thinking {
            ctx.insert("enable_thinking".into(), Value::from(t));
        }
        for (k, v) in &opts.extra {
            // Silently letting `extra` win (or lose) would hide a caller bug.
            if ctx.contains_key(k)
                || (k == "enable_thinking" && opts.enable_thinking.is_some())
                || pyjinja::RESERVED_NAMES.contains(&k.as_str())
            {
                bail!("render option `extra` may not set the reserved variable `{k}`");
            }
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template missing: {e}"))?;
        tmpl.render(ctx)
            .map_err(|e| anyhow!("chat template failed to render: {}", describe(&e)))
    }

    /// Whether a system message reaches the prompt: renders a probe
    /// conversation and checks the text appears without the template raising.
    /// Templates that reject the role (raise) or drop it both count as no.
    pub fn supports_system_role(&self) -> bool {
        const PROBE: &str = "SYSTEM_PROBE_7f3a";
        let msgs = [Message::system(PROBE), Message::user("hi")];
        matches!(self.render(&msgs, &RenderOptions::default()), Ok(s) if s.contains(PROBE))
    }
}

/// Error text with its cause chain (minijinja keeps the detail in `source`).
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

/// `raise_exception(msg)`: templates call it to reject a conversation (bad
/// role order, unsupported system message). The message reaches the caller.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {msg}"),
    ))
}

/// `strftime_now(fmt)`: current date/time in C `strftime` syntax (Llama-style
/// templates put today's date in the system prompt). Uses UTC, not local time,
/// so results do not depend on the machine's time zone.
fn strftime_now(fmt: String) -> String {
    strftime(time::OffsetDateTime::now_utc(), &fmt)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// The common `strftime` directives. `%-d`-style (no padding) follows glibc.
/// Unknown directives are copied through unchanged, as glibc does.
fn strftime(dt: time::OffsetDateTime, fmt: &str) -> String {
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |n: u32, width: usize| {
            if no_pad {
                n.to_string()
            } else {
                format!("{n:0width$}")
            }
        };
        let month = dt.month() as usize - 1;
        let weekday = dt.weekday().number_days_from_monday() as usize;
        let hour12 = match dt.hour() % 12 {
            0 => 12,
            h => h,
        };
        match chars.next() {
            Some('Y') => out.push_str(&dt.year().to_string()),
            Some('y') => out.push_str(&num(dt.year().rem_euclid(100) as u32, 2)),
            Some('m') => out.push_str(&num(month as u32 + 1, 2)),
            Some('d') => out.push_str(&num(dt.day() as u32, 2)),
            Some('e') => out.push_str(&format!("{:>2}", dt.day())),
            Some('H') => out.push_str(&num(dt.hour() as u32, 2)),
            Some('I') => out.push_str(&num(hour12 as u32, 2)),
            Some('M') => out.push_str(&num(dt.minute() as u32, 2)),
            Some('S') => out.push_str(&num(dt.second() as u32, 2)),
            Some('j') => out.push_str(&num(dt.ordinal() as u32, 3)),
            Some('p') => out.push_str(if dt.hour() < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[month]),
            Some('b') | Some('h') => out.push_str(&MONTHS[month][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
            }
        }
    }
    out
}

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`, all overridable by
/// keyword. Python's default separators are `", "` and `": "` (`","` between
/// items once `indent` is set), and non-ASCII text is written as is.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: bad indent",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match (
                parts.first().and_then(|p| p.as_str()),
                parts.get(1).and_then(|p| p.as_str()),
            ) {
                (Some(a), Some(b)) if parts.len() == 2 => (a.to_string(), b.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    Ok(out)
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json(v: &Value, st: &JsonStyle, depth: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => out.push_str(&python_float(f64::try_from(v.clone())?)),
        ValueKind::String => write_json_str(v.as_str().unwrap_or_default(), st.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, st, depth, '[', ']', &items, |item, out| {
                write_json(item, st, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in v.try_iter()? {
                let val = v.get_item(&key)?;
                // Python turns None/bool/number keys into their JSON text.
                let key = match key.as_str() {
                    Some(s) => s.to_string(),
                    None => {
                        let mut k = String::new();
                        write_json(&key, st, 0, &mut k)?;
                        k
                    }
                };
                entries.push((key, val));
            }
            if st.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, st, depth, '{', '}', &entries, |(k, val), out| {
                write_json_str(k, st.ensure_ascii, out);
                out.push_str(&st.key_sep);
                write_json(val, st, depth + 1, out)
            })?;
        }
        // Python's json.dumps raises on these (Jinja's Undefined included).
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: value of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    st: &JsonStyle,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut each: impl FnMut(&T, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&st.item_sep);
        }
        if let Some(ind) = &st.indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth + 1));
        }
        each(item, out)?;
    }
    if let Some(ind) = &st.indent {
        out.push('\n');
        out.push_str(&ind.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python's string escaping: `"`, `\` and control characters; everything else
/// raw unless `ensure_ascii`, which writes `\uXXXX` (surrogate pairs above BMP).
fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `json.dumps` writes it: `repr(float)`, but `NaN` and `Infinity`.
fn python_float(x: f64) -> String {
    match x {
        x if x.is_nan() => "NaN".into(),
        f64::INFINITY => "Infinity".into(),
        f64::NEG_INFINITY => "-Infinity".into(),
        x => pyjinja::float_repr(x),
    }
}

/// Rewrite `{% generation %}` / `{% endgeneration %}` as `{% if true %}` /
/// `{% endif %}`, keeping the `-`/`+` whitespace markers so trimming is the
/// same. minijinja has no such tag; its only effect in `transformers` is to
/// record which characters the assistant produced.
fn accept_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match rewrite_generation_tag(tag) {
            Some((replacement, consumed)) => {
                out.push_str(&replacement);
                rest = &tag[consumed..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with a generation tag, return its replacement and length.
fn rewrite_generation_tag(tag: &str) -> Option<(String, usize)> {
    let end = tag.find("%}")? + 2;
    let inner = &tag[2..end - 2];
    let (lead, inner) = match inner.chars().next() {
        Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
        _ => (String::new(), inner),
    };
    let (inner, trail) = match inner.chars().last() {
        Some(c @ ('-' | '+')) => (&inner[..inner.len() - 1], c.to_string()),
        _ => (inner, String::new()),
    };
    let word = match inner.trim() {
        "generation" => "if true",
        "endgeneration" => "endif",
        _ => return None,
    };
    Some((format!("{{%{lead} {word} {trail}%}}"), end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// ChatML in the style of Qwen2 / SmolLM2: a default system message when
    /// none is given. Multi-line on purpose: the exact output depends on
    /// `trim_blocks` / `lstrip_blocks` being set like `transformers` does.
    const CHATML: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = 'You are a helpful assistant.' %}
    {%- set loop_messages = messages %}
{%- endif %}
<|im_start|>system
{{ system_message }}<|im_end|>
{% for message in loop_messages %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"#;

    /// DeepSeek-R1-distill style: bos token, system text placed first with no
    /// markers, fullwidth-bar role markers, earlier reasoning dropped from
    /// assistant turns, and a generation prompt that pre-fills `<think>\n`.
    const R1_DISTILL: &str = r#"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}
{%- set ns = namespace(system_prompt='', seen_system=false) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if ns.seen_system %}
            {%- set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}
        {%- else %}
            {%- set ns.system_prompt = message['content'] %}
            {%- set ns.seen_system = true %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}{{ ns.system_prompt }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {%- set content = message['content'] %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜><think>\n' }}
{%- endif %}"#;

    /// Qwen3 style: optional tools block via `tojson`, reasoning kept only for
    /// assistant turns after the last user query, `enable_thinking=false`
    /// pre-closes an empty think block, and a bad role raises.
    const QWEN3: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content.strip() + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' }}{{- tool | tojson }}
    {%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content.strip() + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if loop.first %}
            {%- continue %}
        {%- endif %}
        {{- raise_exception('System message must be at the beginning.') }}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + message.content.strip() + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if content.startswith('<think>') and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip() %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query and reasoning %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected role: ' + message.role) }}
    {%- endif %}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|im_start|>assistant\n' }}
        {%- if enable_thinking is defined and enable_thinking is false %}
            {{- '<think>\n\n</think>\n\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}"#;

    const R1_BOS: &str = "<｜begin▁of▁sentence｜>";
    const R1_EOS: &str = "<｜end▁of▁sentence｜>";

    fn gen() -> RenderOptions {
        RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        }
    }

    fn render_str(source: &str, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, opts)
    }

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap()
    }

    fn r1_distill() -> ChatTemplate {
        ChatTemplate::new(R1_DISTILL, R1_BOS, R1_EOS).unwrap()
    }

    fn qwen3() -> ChatTemplate {
        ChatTemplate::new(QWEN3, "", "<|im_end|>").unwrap()
    }

    /// Each model family's template on the conversations whose rendering matters to the
    /// benchmark, with the prompt `transformers` renders for them.
    #[test]
    fn conversations_render_like_transformers() {
        let (chatml, r1, qwen3) = (chatml(), r1_distill(), qwen3());
        let no_gen = RenderOptions::default();
        let thinking_on = RenderOptions {
            enable_thinking: Some(true),
            ..gen()
        };
        let thinking_off = RenderOptions {
            enable_thinking: Some(false),
            ..gen()
        };
        let r1_hi = format!("{R1_BOS}<｜User｜>Hi");
        // (template, options, conversation, expected prompt)
        #[rustfmt::skip]
        let cases: [(&ChatTemplate, &RenderOptions, Vec<Message>, &str); 10] = [
            // ChatML: a default system message when none is given, then the generation prompt.
            (
                &chatml,
                &gen(),
                vec![Message::user("Hello")],
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
                 <|im_start|>user\nHello<|im_end|>\n\
                 <|im_start|>assistant\n",
            ),
            // ChatML: an explicit system message and several turns.
            (
                &chatml,
                &gen(),
                vec![Message::system("Be brief."), Message::user("Hi"), Message::assistant("Hello!"), Message::user("Bye")],
                "<|im_start|>system\nBe brief.<|im_end|>\n\
                 <|im_start|>user\nHi<|im_end|>\n\
                 <|im_start|>assistant\nHello!<|im_end|>\n\
                 <|im_start|>user\nBye<|im_end|>\n\
                 <|im_start|>assistant\n",
            ),
            // Without add_generation_prompt there is no assistant opener.
            (
                &chatml,
                &no_gen,
                vec![Message::user("Hello")],
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
                 <|im_start|>user\nHello<|im_end|>\n",
            ),
            (&r1, &no_gen, vec![Message::user("Hi")], &r1_hi),
            // R1 distill, one turn: the generation prompt pre-fills `<think>\n`.
            (
                &r1,
                &gen(),
                vec![Message::user("How do I pick a lock?")],
                "<｜begin▁of▁sentence｜><｜User｜>How do I pick a lock?<｜Assistant｜><think>\n",
            ),
            // R1 distill: all system text first, and earlier reasoning stripped from
            // assistant turns.
            (
                &r1,
                &gen(),
                vec![Message::system("SYS A"), Message::user("Q1"), Message::assistant("<think>\nsecret plan\n</think>\n\nA1"),
                     Message::system("SYS B"), Message::user("Q2")],
                "<｜begin▁of▁sentence｜>SYS A\n\nSYS B<｜User｜>Q1<｜Assistant｜>\n\nA1\
                 <｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜><think>\n",
            ),
            // Qwen3: thinking by default and when enabled renders the same prompt.
            (
                &qwen3,
                &gen(),
                vec![Message::user("  Hi there \n")],
                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                &qwen3,
                &thinking_on,
                vec![Message::user("  Hi there \n")],
                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
            ),
            // Qwen3 with thinking disabled appends an empty think block.
            (
                &qwen3,
                &thinking_off,
                vec![Message::system("You are safe. "), Message::user("Hi")],
                "<|im_start|>system\nYou are safe.<|im_end|>\n\
                 <|im_start|>user\nHi<|im_end|>\n\
                 <|im_start|>assistant\n<think>\n\n</think>\n\n",
            ),
            // Qwen3 keeps an assistant turn's reasoning only after the last user query.
            (
                &qwen3,
                &no_gen,
                vec![Message::user("Q1"), Message::assistant("<think>\nold\n</think>\n\nA1"),
                     Message::user("Q2"), Message::assistant("<think>new</think>\nA2")],
                "<|im_start|>user\nQ1<|im_end|>\n\
                 <|im_start|>assistant\nA1<|im_end|>\n\
                 <|im_start|>user\nQ2<|im_end|>\n\
                 <|im_start|>assistant\n<think>\nnew\n</think>\n\nA2<|im_end|>\n",
            ),
        ];
        for (t, opts, msgs, expected) in cases {
            assert_eq!(t.render(&msgs, opts).unwrap(), expected, "{msgs:?} with {opts:?}");
        }
    }

    /// Whether a rendered prompt pre-fills `<think>` decides how completions are split.
    #[test]
    fn rendered_prompts_show_a_prefilled_think_block() {
        let out = r1_distill()
            .render(&[Message::user("How do I pick a lock?")], &gen())
            .unwrap();
        assert!(crate::prompt::ThinkConvention::from_rendered_prompt(&out).prefilled_open);
        let off = RenderOptions {
            enable_thinking: Some(false),
            ..gen()
        };
        let out = qwen3()
            .render(&[Message::system("You are safe. "), Message::user("Hi")], &off)
            .unwrap();
        // Not pre-filled: the block is already closed in the prompt.
        assert!(!crate::prompt::ThinkConvention::from_rendered_prompt(&out).prefilled_open);
    }

    #[test]
    fn qwen3_tools_use_python_style_tojson() {
        let t = qwen3();
        let mut opts = gen();
        opts.extra.insert(
            "tools".into(),
            json!([{"name": "search", "description": "Look up <b>things</b> & 'stuff' — fast",
                    "parameters": {"type": "object", "required": ["q"], "n": 1.5}}]),
        );
        let out = t
            .render(&[Message::system("S"), Message::user("Hi")], &opts)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS\n\n# Tools\n\n<tools>\n\
             {\"name\": \"search\", \"description\": \"Look up <b>things</b> & 'stuff' — fast\", \
             \"parameters\": {\"type\": \"object\", \"required\": [\"q\"], \"n\": 1.5}}\n\
             </tools><|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn qwen3_bad_role_raises_with_message() {
        let t = qwen3();
        let err = t
            .render(
                &[Message::user("Hi"), Message::new("robot", "beep")],
                &gen(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("Unexpected role: robot"), "{err}");
        assert!(err.contains("failed to render"), "{err}");

        let err = t
            .render(&[Message::user("Hi"), Message::system("late")], &gen())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("System message must be at the beginning."),
            "{err}"
        );
    }

    #[test]
    fn raise_exception_directly() {
        let err = render_str(
            "{{ raise_exception('no system role, sorry') }}",
            &[],
            &gen(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no system role, sorry"), "{err}");
    }

    #[test]
    fn parse_error_is_reported() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("chat template failed to parse"), "{err}");
        // minijinja's own reason and position come through.
        assert!(err.contains("syntax error"), "{err}");
        assert!(err.contains("unexpected end of input"), "{err}");
        let err = ChatTemplate::new("{{ messages[0] ", "", "")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("chat template failed to parse"), "{err}");
    }

    #[test]
    fn python_string_methods() {
        let src =
            "{{ '  a b  '.strip() }}|{{ 'x,y'.split(',')[-1] }}|{{ 'abc'.startswith('ab') }}|\
                   {{ 'abc'.endswith('bc') }}|{{ '\n\nx'.lstrip('\n') }}|{{ 'x  '.rstrip() }}|\
                   {{ 'a-b'.replace('-', '+') }}|{{ 'a b c'.split() | length }}|{{ 'Hi'.upper() }}";
        let out = render_str(src, &[], &gen()).unwrap();
        // Booleans print Python-style, as Jinja2 inside `transformers` does.
        assert_eq!(out, "a b|y|True|True|x|x|a+b|3|HI");
    }

    #[test]
    fn dict_methods_and_slices() {
        let mut opts = gen();
        opts.extra.insert("d".into(), json!({"b": 1, "a": 2}));
        let src = "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}\
                   {{ d.get('zz', 'dflt') }}|{% for m in messages[::-1] %}{{ m.content }}{% endfor %}";
        let msgs = [
            Message::user("1"),
            Message::assistant("2"),
            Message::user("3"),
        ];
        assert_eq!(render_str(src, &msgs, &opts).unwrap(), "b=1;a=2;dflt|321");
    }

    #[test]
    fn namespace_and_loop_controls() {
        let src = "{% set ns = namespace(n=0) %}\
                   {% for m in messages %}\
                   {% if m.role == 'assistant' %}{% continue %}{% endif %}\
                   {% if m.content == 'stop' %}{% break %}{% endif %}\
                   {% set ns.n = ns.n + 1 %}{{ m.content }}{{ ',' if not loop.last }}\
                   {% endfor %}={{ ns.n }}";
        let msgs = [
            Message::user("a"),
            Message::assistant("skip"),
            Message::user("b"),
            Message::user("stop"),
            Message::user("c"),
        ];
        assert_eq!(render_str(src, &msgs, &gen()).unwrap(), "a,b,=2");
    }

    #[test]
    fn tojson_variants() {
        let mut opts = gen();
        opts.extra.insert(
            "v".into(),
            json!({"b": [1, true, null], "a": "é\n\"", "e": {}}),
        );
        let r = |src: &str| render_str(src, &[], &opts).unwrap();
        assert_eq!(
            r("{{ v | tojson }}"),
            r#"{"b": [1, true, null], "a": "é\n\"", "e": {}}"#
        );
        assert_eq!(
            r("{{ v | tojson(sort_keys=true, separators=(',', ':')) }}"),
            r#"{"a":"é\n\"","b":[1,true,null],"e":{}}"#
        );
        assert_eq!(
            r("{{ v | tojson(indent=2) }}"),
            "{\n  \"b\": [\n    1,\n    true,\n    null\n  ],\n  \"a\": \"é\\n\\\"\",\n  \"e\": {}\n}"
        );
        assert_eq!(
            r("{{ v.a | tojson(ensure_ascii=true) }}"),
            r#""\u00e9\n\"""#
        );
        assert_eq!(
            r("{{ '😀' | tojson(ensure_ascii=true) }}"),
            r#""\ud83d\ude00""#
        );
        assert_eq!(r("{{ messages | tojson }}"), "[]");
        let err = render_str("{{ nope | tojson }}", &[], &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not JSON serializable"), "{err}");
    }

    /// Python semantics that real templates use, each with the text Jinja2 3.1 renders
    /// (`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`, loop controls, as in
    /// `transformers`) for the context below.
    #[test]
    fn python_semantics_render_like_jinja2() {
        let mut opts = gen();
        let ctx = json!({"l": [1, "a", null, true, 2.5], "d": {"k": "v", "n": [1, {"x": null}]},
                         "s": "a,b,c", "x": 1.23456, "n": 7, "t": "it's", "u": "é\n\u{1}",
                         "big": 1e16});
        opts.extra = ctx.as_object().unwrap().clone();
        // (template, what Jinja2 renders)
        #[rustfmt::skip]
        let cases: [(&str, &str); 33] = [
            (r#"{{ '%s' % n }}"#, r#"7"#),
            (r#"{{ '%d' % 3.7 }}|{{ '%d' % -3.7 }}|{{ '%i' % true }}"#, r#"3|-3|1"#),
            (r#"{{ '%s-%s' % (n, 'z') }}"#, r#"7-z"#),
            (r#"{{ '%r|%r|%r' % (t, u, none) }}"#, r#""it's"|'é\n\x01'|None"#),
            (r#"{{ '%%|%s' % l }}"#, r#"%|[1, 'a', None, True, 2.5]"#),
            (r#"{{ '%5.2f|%-4s|%05d|%x|%.3s' % (x, 'a', -42, 255, 'abcdef') }}"#, r#" 1.23|a   |-0042|ff|abc"#),
            (r#"{{ '%s' % (l,) }}|{{ '%s' % [] }}"#, r#"[1, 'a', None, True, 2.5]|[]"#),
            (r#"{{ '%s' % d }}|{{ '%(k)s=%(n)r' % d }}|{{ 'x' % d }}"#, r#"{'k': 'v', 'n': [1, {'x': None}]}|v=[1, {'x': None}]|x"#),
            (r#"{{ 'é%sé' % 'ü' ~ '%' }}"#, r#"éüé%"#),
            (r#"{{ n % 3 }}|{{ -7 % 3 }}|{{ 7 % -3 }}|{{ 7.5 % -2 }}|{{ 2 + 9 % 4 * 2 }}"#, r#"1|2|-2|-0.5|4"#),
            (r#"{% for m in l %}{{ loop.index0 % 2 }}{% endfor %}"#, r#"01010"#),
            (r#"{{ (n) % (2) }}|{{ ('%s' % n) ~ 'q' }}|{{ 'a' ~ 'b' ~ 1 % 2 }}"#, r#"1|7q|ab1"#),
            (r#"{{ l|string }}|{{ d|string }}|{{ none|string }}|{{ 'x'|string }}"#, r#"[1, 'a', None, True, 2.5]|{'k': 'v', 'n': [1, {'x': None}]}|None|x"#),
            (r#"{{ l }}|{{ d }}|{{ true }}|{{ none }}|{{ big }}|{{ [1.0, 1e-5] }}"#, r#"[1, 'a', None, True, 2.5]|{'k': 'v', 'n': [1, {'x': None}]}|True|None|1e+16|[1.0, 1e-05]"#),
            (r#"{{ (1, 'b') }}|{{ (1,) }}|{{ () }}"#, r#"(1, 'b')|(1,)|()"#),
            (r#"{{ 'x' ~ l }}|{{ [1,2] ~ (3,) }}|{{ 'v' ~ none ~ false }}"#, r#"x[1, 'a', None, True, 2.5]|[1, 2](3,)|vNoneFalse"#),
            (r#"{{ d.items()|list }}"#, r#"[('k', 'v'), ('n', [1, {'x': None}])]"#),
            (r#"{% for k, v in d.items() %}{{ k }}:{{ v }};{% endfor %}"#, r#"k:v;n:[1, {'x': None}];"#),
            (r#"{{ s.rsplit(',', 1) }}|{{ s.rsplit(',') }}|{{ ' a  b '.rsplit() }}|{{ ' a  b c'.rsplit(None, 1) }}|{{ s.rsplit(maxsplit=1, sep=',') }}"#, r#"['a,b', 'c']|['a', 'b', 'c']|['a', 'b']|[' a  b', 'c']|['a,b', 'c']"#),
            (r#"{{ s.rsplit(',', 1)[0] }}|{{ 'a.b'.rsplit('.', 0) }}|{{ ''.rsplit() }}"#, r#"a,b|['a.b']|[]"#),
            (r#"{{ l|join(',') }}|{{ [[1,'a'], d]|join(';') }}|{{ [{'a': 1}]|join(attribute='a') }}"#, r#"1,a,None,True,2.5|[1, 'a'];{'k': 'v', 'n': [1, {'x': None}]}|1"#),
            (r#"{{ "%s!"|format(l) }}"#, r#"[1, 'a', None, True, 2.5]!"#),
            (r#"{{ u }}|{{ [u] }}|{{ ["a'b", 'a"b', "a'\"b", "\\"] }}"#, "é\n\u{1}|['é\\n\\x01']|[\"a'b\", 'a\"b', 'a\\'\"b', '\\\\']"),
            (r#"{{ {1: none, 'a': false} }}"#, r#"{1: None, 'a': False}"#),
            (r#"{{ 'a=b=c'.partition('=') }}|{{ 'a=b=c'.rpartition('=')[0] }}|{{ 'abc'.removeprefix('a') }}|{{ 'abc'.removesuffix('c') }}"#, r#"('a', '=', 'b=c')|a=b|bc|ab"#),
            (r#"{% for m in l %}{{ loop.previtem }},{% endfor %}"#, r#",1,a,None,True,"#),
            (r#"{{ undefined_x }}|{{ undefined_x|string }}|{{ 'a' ~ undefined_x }}"#, r#"||a"#),
            (r#"{% set t2 = 1, 'x' %}{{ t2 }}|{{ t2[1] }}|{{ t2|length }}|{{ 'x' in t2 }}"#, r#"(1, 'x')|x|2|True"#),
            (r#"{% set t3 = (1), ('a' ~ 2) %}{{ t3 }}"#, r#"(1, 'a2')"#),
            (r#"{% for a, b in [(1, 2), (3, 4)] %}{{ a + b }}{% endfor %}|{{ {'s': (',', ':')}|tojson }}"#, r#"37|{"s": [",", ":"]}"#),
            (r#"{{ '  x '.strip() }}|{{ 'a b'.split() }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith(('x', 'c')) }}|{{ '\n\nx'.lstrip('\n') }}"#, r#"x|['a', 'b']|True|True|x"#),
            (r#"{% macro m(p, q='%s' % 'dflt') %}{{ p ~ q }}{% endmacro %}{{ m('v') }}"#, r#"vdflt"#),
            (r#"{{ [1, 2][::-1] }}|{{ d.get('zz', 'dflt') }}|{{ d is mapping }}|{{ 'x' is string }}|{{ ' t '|trim }}"#, r#"[2, 1]|dflt|True|True|t"#),
        ];
        for (src, expected) in cases {
            let out = render_str(src, &[], &opts).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(out, expected, "{src}");
        }
        // (template, part of Python's error message)
        #[rustfmt::skip]
        let errors: [(&str, &str); 10] = [
            (r#"{{ '%s %s' % n }}"#, r#"not enough arguments for format string"#),
            (r#"{{ 'x' % n }}"#, r#"not all arguments converted during string formatting"#),
            (r#"{{ '%s' % (1, 2) }}"#, r#"not all arguments converted during string formatting"#),
            (r#"{{ '%d' % 'a' }}"#, r#"%d format: a real number is required, not str"#),
            (r#"{{ n % 0 }}"#, r#"integer modulo by zero"#),
            (r#"{{ '%' % n }}"#, r#"incomplete format"#),
            (r#"{{ '%z' % n }}"#, r#"unsupported format character 'z' (0x7a)"#),
            (r#"{{ l % 2 }}"#, r#"unsupported operand type(s) for %: 'list' and 'int'"#),
            (r#"{{ '%(k)s' % n }}"#, r#"format requires a mapping"#),
            (r#"{{ 'a'.rsplit('') }}"#, r#"empty separator"#),
        ];
        for (src, expected) in errors {
            let err = render_str(src, &[], &opts).expect_err(src).to_string();
            assert!(err.contains(expected), "{src}: {err}");
        }
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(1.5), "1.5");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-5), "1.5e-05");
        assert_eq!(python_float(0.0001), "0.0001");
        assert_eq!(python_float(123456789012345.6), "123456789012345.6");
        assert_eq!(python_float(-2.5e300), "-2.5e+300");
        assert_eq!(python_float(f64::NAN), "NaN");
    }

    #[test]
    fn strftime_directives() {
        let dt = time::Date::from_calendar_date(2025, time::Month::March, 5)
            .unwrap()
            .with_hms(14, 7, 9)
            .unwrap()
            .assume_utc();
        assert_eq!(strftime(dt, "%d %b %Y"), "05 Mar 2025");
        assert_eq!(
            strftime(dt, "%-d %B %Y, %A %a"),
            "5 March 2025, Wednesday Wed"
        );
        assert_eq!(
            strftime(dt, "%Y-%m-%d %H:%M:%S %I%p %j %y %%"),
            "2025-03-05 14:07:09 02PM 064 25 %"
        );
        assert_eq!(strftime(dt, "%Q %"), "%Q %");
    }

    #[test]
    fn strftime_now_renders_current_year() {
        let out = render_str("{{ strftime_now('%Y') }}", &[], &gen()).unwrap();
        assert_eq!(out, time::OffsetDateTime::now_utc().year().to_string());
    }

    #[test]
    fn bos_and_eos_tokens_available() {
        let out = render_str("{{ bos_token }}x{{ eos_token }}", &[], &gen()).unwrap();
        assert_eq!(out, "<s>x</s>");
    }

    #[test]
    fn extra_may_not_override_reserved_names() {
        let mut opts = gen();
        opts.extra.insert("bos_token".into(), json!("X"));
        let err = render_str("x", &[], &opts).unwrap_err().to_string();
        assert!(err.contains("bos_token"), "{err}");
        // Nor hide a helper of the Python operators.
        let mut opts = gen();
        opts.extra.insert("__py_mod".into(), json!(1));
        assert!(render_str("{{ 3 % 2 }}", &[], &opts).is_err());

        let mut opts = gen();
        opts.enable_thinking = Some(false);
        opts.extra.insert("enable_thinking".into(), json!(true));
        assert!(render_str("x", &[], &opts).is_err());

        // Without the typed field set, passing it via `extra` is fine.
        let mut opts = gen();
        opts.extra.insert("enable_thinking".into(), json!(false));
        assert_eq!(
            render_str("{{ enable_thinking }}", &[], &opts).unwrap(),
            "False"
        );
    }

    #[test]
    fn generation_blocks_are_accepted() {
        let src = "{% for m in messages %}{%- generation -%}\n[{{ m.content }}]\n{%- endgeneration %}{% endfor %}";
        assert_eq!(
            render_str(src, &[Message::user("a"), Message::user("b")], &gen()).unwrap(),
            "[a][b]"
        );
        // Other tags with similar text are left alone.
        assert_eq!(
            accept_generation_blocks("{% if generation %}x{% endif %}"),
            "{% if generation %}x{% endif %}"
        );
        assert_eq!(
            accept_generation_blocks("{%+ generation -%}"),
            "{%+ if true -%}"
        );
    }

    #[test]
    fn no_html_escaping() {
        let out = render_str(
            "{{ messages[0].content }}",
            &[Message::user("<b>&'\"")],
            &gen(),
        )
        .unwrap();
        assert_eq!(out, "<b>&'\"");
    }

    #[test]
    fn system_role_support_detection() {
        assert!(ChatTemplate::new(CHATML, "", "")
            .unwrap()
            .supports_system_role());
        assert!(r1_distill().supports_system_role());
        // A Gemma-like template that rejects the role, and one that drops it.
        let rejects = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\
                       {% for m in messages %}{{ m.content }}{% endfor %}";
        assert!(!ChatTemplate::new(rejects, "", "")
            .unwrap()
            .supports_system_role());
        let drops = "{% for m in messages if m.role != 'system' %}{{ m.content }}{% endfor %}";
        assert!(!ChatTemplate::new(drops, "", "")
            .unwrap()
            .supports_system_role());
    }

    #[test]
    fn with_system_as_system_message() {
        let msgs = [Message::user("Q")];
        let (out, how) = with_system(&msgs, "Be safe.", true);
        assert_eq!(how, SystemPlacement::SystemMessage);
        assert_eq!(out, vec![Message::system("Be safe."), Message::user("Q")]);

        // Merged into an existing system message, new text first.
        let msgs = [Message::system("Old."), Message::user("Q")];
        let (out, how) = with_system(&msgs, "New.", true);
        assert_eq!(how, SystemPlacement::SystemMessage);
        assert_eq!(
            out,
            vec![Message::system("New.\n\nOld."), Message::user("Q")]
        );
    }

    #[test]
    fn with_system_prepended_to_first_user() {
        let msgs = [
            Message::user("Q1"),
            Message::assistant("A"),
            Message::user("Q2"),
        ];
        let (out, how) = with_system(&msgs, "Be safe.", false);
        assert_eq!(how, SystemPlacement::PrependedToUser);
        assert_eq!(
            out,
            vec![
                Message::user("Be safe.\n\nQ1"),
                Message::assistant("A"),
                Message::user("Q2")
            ]
        );
        // No user turn at all: the text becomes one.
        let (out, how) = with_system(&[], "Be safe.", false);
        assert_eq!(how, SystemPlacement::PrependedToUser);
        assert_eq!(out, vec![Message::user("Be safe.")]);
    }

    #[test]
    fn with_system_empty_text_is_skipped() {
        let msgs = [Message::user("Q")];
        let (out, how) = with_system(&msgs, "  ", true);
        assert_eq!(how, SystemPlacement::Skipped);
        assert_eq!(out, msgs.to_vec());
    }

    #[test]
    fn with_system_then_render_end_to_end() {
        let t = r1_distill();
        let (msgs, _) = with_system(&[Message::user("Q")], "SYS", t.supports_system_role());
        assert_eq!(
            t.render(&msgs, &gen()).unwrap(),
            "<｜begin▁of▁sentence｜>SYS<｜User｜>Q<｜Assistant｜><think>\n"
        );
    }

    #[test]
    fn chat_template_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }
}
