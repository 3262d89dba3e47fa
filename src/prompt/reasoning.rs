//! Splitting a reasoning model's completion into its thinking and its response.
//!
//! Reasoning models (DeepSeek-R1 distills, Qwen3, QwQ) write a chain of thought
//! between `<think>` and `</think>` and then the answer the user sees. The
//! benchmark judges both parts separately, so the split has to be exact and it
//! has to say when it could not be made cleanly (an unclosed think block means
//! the model ran out of tokens while still reasoning, or stopped without
//! answering).
//!
//! Tags are matched exactly and case-sensitively: the models emit `<think>` and
//! `</think>` as dedicated special tokens, so a `<Think>` or `</THINK>` in the
//! output is ordinary text the model chose to write, not a boundary.
//!
//! Only the *first* closing tag ends the thinking. Anything after it, including
//! a second `</think>` or a fresh `<think>`, belongs to the response: the model
//! has already handed over its answer and we report what the user would see.

use serde::{Deserialize, Serialize};

/// How a model marks its reasoning, and whether the prompt already opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinkConvention {
    /// Opening tag, e.g. `<think>`.
    pub open: String,
    /// Closing tag, e.g. `</think>`.
    pub close: String,
    /// True when the chat template's generation prompt already ends with the
    /// opening tag, so the completion starts *inside* the think block and only
    /// the closing tag appears in the output.
    pub prefilled_open: bool,
}

impl Default for ThinkConvention {
    fn default() -> Self {
        Self {
            open: "<think>".to_string(),
            close: "</think>".to_string(),
            prefilled_open: false,
        }
    }
}

impl ThinkConvention {
    /// Plain `<think>`/`</think>` with an explicit prefill flag.
    pub fn think_tags(prefilled_open: bool) -> Self {
        Self {
            prefilled_open,
            ..Self::default()
        }
    }

    /// DeepSeek-R1 distills: their chat template ends the generation prompt
    /// with `<｜Assistant｜><think>\n`, so the output holds only `</think>`.
    pub fn deepseek_r1() -> Self {
        Self::think_tags(true)
    }

    /// Qwen3 (hybrid thinking models): the model writes `<think>` itself. With
    /// `enable_thinking=false` the template pre-closes an empty block, so the
    /// output has no tags and is all response, which this convention handles.
    pub fn qwen3() -> Self {
        Self::think_tags(false)
    }

    /// QwQ-32B: like the R1 distills, its template pre-fills `<think>\n`.
    pub fn qwq() -> Self {
        Self::think_tags(true)
    }

    /// Infer the convention from the prompt actually sent to the model: if the
    /// rendered prompt ends (ignoring trailing whitespace) with the opening tag,
    /// the think block was pre-filled. This is more reliable than a per-model
    /// table because templates change between model revisions.
    pub fn from_rendered_prompt(prompt: &str) -> Self {
        let mut c = Self::default();
        c.prefilled_open = prompt.trim_end().ends_with(&c.open);
        c
    }
}

/// A completion split into its reasoning and the answer after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCompletion {
    /// Text inside the think block, trimmed. Empty when there was none.
    pub thinking: String,
    /// Text the user would see, trimmed.
    pub response: String,
    /// The think block was opened but never closed. Usually the token limit
    /// cut the model off mid-reasoning; we cannot tell that apart from a model
    /// that stopped on its own without closing the block.
    pub truncated_thinking: bool,
    /// At least one tag (open or close) was found in the completion itself.
    /// False for a pre-filled completion with no closing tag, and for a plain
    /// answer without reasoning.
    pub had_think_tags: bool,
}

/// Split a raw completion (special tokens decoded, no further cleanup) into
/// thinking and response according to `convention`.
pub fn split_completion(raw: &str, convention: &ThinkConvention) -> SplitCompletion {
    let open = convention.open.as_str();
    let close = convention.close.as_str();

    if convention.prefilled_open {
        // Some template revisions pre-fill the tag and the model still repeats
        // it (older R1 distill templates did not pre-fill at all). Skip one
        // leading copy so it does not end up inside the thinking text.
        let body = raw.trim_start();
        let body = body.strip_prefix(open).unwrap_or(body);
        return split_after_open(body, close, "", false);
    }

    match raw.find(open) {
        Some(i) => {
            // Text before the opening tag is normally just whitespace. If the
            // model wrote something real there, the user would see it, so it
            // stays in the response rather than being dropped.
            let before = &raw[..i];
            let body = &raw[i + open.len()..];
            split_after_open(body, close, before, true)
        }
        None => match raw.find(close) {
            // A closing tag with no opening one: the prompt pre-filled the
            // block although the convention said it did not (a template
            // revision changed). Treating the text before it as thinking is the
            // only reading that does not leak reasoning into the response.
            Some(_) => split_after_open(raw, close, "", true),
            // No tags: a plain answer with no visible reasoning.
            None => SplitCompletion {
                thinking: String::new(),
                response: raw.trim().to_string(),
                truncated_thinking: false,
                had_think_tags: false,
            },
        },
    }
}

/// `body` starts inside the think block. Split it at the first `close`;
/// `before` is any text that preceded the opening tag; `saw_open` records
/// whether the opening tag was in the completion itself.
fn split_after_open(body: &str, close: &str, before: &str, saw_open: bool) -> SplitCompletion {
    match body.find(close) {
        Some(j) => SplitCompletion {
            thinking: body[..j].trim().to_string(),
            response: join_nonempty(before.trim(), body[j + close.len()..].trim()),
            truncated_thinking: false,
            had_think_tags: true,
        },
        None => SplitCompletion {
            thinking: body.trim().to_string(),
            response: before.trim().to_string(),
            truncated_thinking: true,
            had_think_tags: saw_open,
        },
    }
}

/// Join two already-trimmed pieces with a blank line, skipping empty ones, so
/// text written before the think block reads as its own paragraph.
fn join_nonempty(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}\n\n{b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(thinking: &str, response: &str, truncated: bool, tags: bool) -> SplitCompletion {
        SplitCompletion {
            thinking: thinking.to_string(),
            response: response.to_string(),
            truncated_thinking: truncated,
            had_think_tags: tags,
        }
    }

    #[test]
    fn default_convention_is_plain_think_tags() {
        let c = ThinkConvention::default();
        assert_eq!(c.open, "<think>");
        assert_eq!(c.close, "</think>");
        assert!(!c.prefilled_open);
        assert!(ThinkConvention::deepseek_r1().prefilled_open);
        assert!(ThinkConvention::qwq().prefilled_open);
        assert!(!ThinkConvention::qwen3().prefilled_open);
    }

    #[test]
    fn split_cases() {
        let plain = ThinkConvention::default();
        let r1 = ThinkConvention::deepseek_r1();
        let qwen3 = ThinkConvention::qwen3();
        let reasoning = ThinkConvention {
            open: "<reasoning>".into(),
            close: "</reasoning>".into(),
            prefilled_open: false,
        };
        // (convention, raw completion, expected thinking, response, truncated_thinking, had_think_tags)
        #[rustfmt::skip]
        let cases = [
            // Basic open and close.
            (&plain, "<think>a</think>b", "a", "b", false, true),
            (&plain, "<think>\nstep 1\nstep 2\n</think>\n\n  The answer.\n", "step 1\nstep 2", "The answer.", false, true),
            // Pre-filled: the output has only the closing tag.
            (&r1, "a</think>b", "a", "b", false, true),
            (&r1, "Okay, the user asks...\n</think>\n\nI can't help with that.", "Okay, the user asks...", "I can't help with that.", false, true),
            // Pre-filled, but the model repeats the opening tag anyway.
            (&r1, "<think>\na</think>b", "a", "b", false, true),
            (&r1, "  <think>a</think>b", "a", "b", false, true),
            // Whitespace before the opening tag is dropped.
            (&qwen3, "\n\n<think>a</think>b", "a", "b", false, true),
            // Text before the opening tag is kept in the response.
            (&qwen3, "Sure.<think>a</think>Here it is.", "a", "Sure.\n\nHere it is.", false, true),
            // Only prefix text and nothing after the block.
            (&qwen3, "Sure. <think>a</think>  ", "a", "Sure.", false, true),
            // An unclosed think block is truncated thinking.
            (&qwen3, "<think>a... and then b", "a... and then b", "", true, true),
            // Prefix text survives even when the block never closes.
            (&qwen3, "Hi <think>a", "a", "Hi", true, true),
            // Pre-filled without a closing tag: all thinking.
            (&r1, "Let me think about this request for a long", "Let me think about this request for a long", "", true, false),
            // An empty completion is an (empty) unclosed block too.
            (&r1, "", "", "", true, false),
            // No tags and not pre-filled: all response.
            (&plain, "  Just an answer.\n", "", "Just an answer.", false, false),
            (&plain, "", "", "", false, false),
            // Qwen3 with thinking off: an empty think block.
            (&qwen3, "<think>\n\n</think>\n\nAnswer", "", "Answer", false, true),
            // A second closing or opening tag stays in the response.
            (&plain, "<think>a</think>b</think>c", "a", "b</think>c", false, true),
            (&plain, "<think>a</think>b<think>c</think>d", "a", "b<think>c</think>d", false, true),
            (&r1, "a</think>b</think>c", "a", "b</think>c", false, true),
            // The template pre-filled `<think>` but the caller picked a non-prefilled
            // convention: reasoning must not leak into the response.
            (&plain, "a\n</think>\n\nb", "a", "b", false, true),
            // Case variants are not tags.
            (&plain, "<Think>a</Think>b", "", "<Think>a</Think>b", false, false),
            // Mixed: a real open tag with a wrong-case close never closes.
            (&plain, "<think>a</THINK>b", "a</THINK>b", "", true, true),
            // Custom tags, and `<think>` is plain text under them.
            (&reasoning, "<reasoning>x</reasoning>y", "x", "y", false, true),
            (&reasoning, "<think>x</think>y", "", "<think>x</think>y", false, false),
            // Multibyte text is sliced safely.
            (&r1, "思考中…</think>答案：不行。", "思考中…", "答案：不行。", false, true),
        ];
        for (c, raw, thinking, response, truncated, tags) in cases {
            assert_eq!(
                split_completion(raw, c),
                sc(thinking, response, truncated, tags),
                "{raw:?} with {c:?}"
            );
        }
    }

    #[test]
    fn convention_from_rendered_prompt() {
        let r1 = "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n";
        assert!(ThinkConvention::from_rendered_prompt(r1).prefilled_open);
        let qwen3 = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
        assert!(!ThinkConvention::from_rendered_prompt(qwen3).prefilled_open);
        // Qwen3 with thinking disabled: the block is already closed.
        let off = "<|im_start|>assistant\n<think>\n\n</think>\n\n";
        assert!(!ThinkConvention::from_rendered_prompt(off).prefilled_open);
    }

    #[test]
    fn serde_round_trip() {
        let s = sc("a", "b", false, true);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(
            j,
            r#"{"thinking":"a","response":"b","truncated_thinking":false,"had_think_tags":true}"#
        );
        assert_eq!(serde_json::from_str::<SplitCompletion>(&j).unwrap(), s);
    }
}
