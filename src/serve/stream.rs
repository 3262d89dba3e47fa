//! The text of one streamed choice, released as deltas that only ever extend what was sent,
//! so a client that concatenates them gets exactly the non-streamed answer: the thinking and
//! the response as [`split_completion`] cuts the finished text.
//!
//! A delta is released only when no later token can change it: an incomplete UTF-8
//! character, a tail that may grow into a stop string (cut from the answer) or into a think
//! tag (which moves text between thinking and response) are held back until the next token
//! decides them.

use crate::backends::local::completion_text;
use crate::prompt::{split_completion, ThinkConvention};

use std::sync::Arc;

/// Text to send for one choice: thinking (`reasoning_content`) and response (`content`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Delta {
    pub thinking: String,
    pub response: String,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.thinking.is_empty() && self.response.is_empty()
    }
}

pub(super) struct ChoiceText {
    tokenizer: Arc<tokenizers::Tokenizer>,
    tokens: Vec<u32>,
    /// The text decoded so far, and the token window the last piece was decoded in: a
    /// token's text depends on the tokens before it (SentencePiece's leading space, byte
    /// pieces of one character), so new tokens are decoded together with the previous piece's
    /// tokens and only the text beyond that piece's is appended (as transformers'
    /// TextStreamer and vLLM's detokenizer do), which keeps the cost linear.
    text: String,
    prefix_offset: usize,
    read_offset: usize,
    stops: Vec<String>,
    think: ThinkConvention,
    sent: Delta,
}

impl ChoiceText {
    pub fn new(tokenizer: Arc<tokenizers::Tokenizer>, stops: Vec<String>, think: ThinkConvention) -> ChoiceText {
        ChoiceText { tokenizer, tokens: Vec::new(), text: String::new(), prefix_offset: 0, read_offset: 0, stops, think, sent: Delta::default() }
    }

/// Feeds the sample's next tokens; returns what can be sent now.
    pub fn push(&mut self, tokens: &[u32]) -> Delta {
        self.tokens.extend_from_slice(tokens);
        let decode = |t: &[u32]| self.tokenizer.decode(t, false).unwrap_or_default();
        let before = decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let now = decode(&self.tokens[self.prefix_offset..]);
        // An incomplete character decodes as U+FFFD: wait for its other bytes.
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            self.text.push_str(&now[before.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
        let visible = settled(&self.text, &self.stops, &self.think);
        let split = split_completion(visible, &self.think);
        self.release(&split.thinking, &split.response)
    }

    /// The finished sample (its final tokens, and whether a stop string ended it): the rest
    /// of the answer, cut exactly as the non-streamed reply is.
    pub fn finish(&mut self, tokens: &[u32], stopped: bool) -> Delta {
        let answer = answer(&self.tokenizer, tokens, &self.stops, stopped, &self.think);
        self.release(&answer.thinking, &answer.response)
    }

    /// The part of `thinking` and `response` not sent yet. Text is only ever appended to
    /// what was sent; should a part no longer start with it (a tokenizer whose pieces decode
    /// differently alone than together), the common prefix is kept and the rest sent.
    fn release(&mut self, thinking: &str, response: &str) -> Delta {
        let out = Delta { thinking: extension(&self.sent.thinking, thinking), response: extension(&self.sent.response, response) };
        self.sent.thinking.push_str(&out.thinking);
        self.sent.response.push_str(&out.response);
        out
    }
}

/// The thinking and response of a finished sample's `tokens` (`stopped`: a stop string ended
/// it): the non-streamed reply, and what a stream's deltas add up to.
pub(super) fn answer(tokenizer: &tokenizers::Tokenizer, tokens: &[u32], stops: &[String], stopped: bool, think: &ThinkConvention) -> Delta {
    let text = completion_text(tokenizer, tokens, stops, stopped).unwrap_or_default();
    let split = split_completion(&text, think);
    Delta { thinking: split.thinking, response: split.response }
}

fn extension(sent: &str, now: &str) -> String {
    if let Some(rest) = now.strip_prefix(sent) {
        return rest.to_string();
    }
    let common = sent.char_indices().zip(now.chars()).find(|((_, a), b)| a != b).map_or(sent.len().min(now.len()), |((i, _), _)| i);
    // Deltas cannot take text back; what differs from here on is sent as it is now.
    now[common..].to_string()
}

/// The part of a partial completion no later token can change: cut at a stop string, without
/// a trailing replacement character (an incomplete UTF-8 character) and without the longest
/// tail that could still become a stop string or a think tag.
fn settled<'t>(text: &'t str, stops: &[String], think: &ThinkConvention) -> &'t str {
    let mut end = stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
    let mut visible = text[..end].trim_end_matches('\u{FFFD}');
    end = visible.len();
    let held = stops
        .iter()
        .map(String::as_str)
        .chain([think.open.as_str(), think.close.as_str()])
        .filter(|s| !s.is_empty())
        .map(|s| partial_suffix(visible, s))
        .max()
        .unwrap_or(0);
    visible = &visible[..end - held];
    visible
}

/// Bytes of the longest tail of `text` that is a proper prefix of `pattern`.
fn partial_suffix(text: &str, pattern: &str) -> usize {
    (1..pattern.len().min(text.len() + 1))
        .rev()
        .find(|&n| pattern.is_char_boundary(n) && text.is_char_boundary(text.len() - n) && text.ends_with(&pattern[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(prefilled: bool) -> ThinkConvention {
        ThinkConvention { prefilled_open: prefilled, ..Default::default() }
    }

    #[test]
    fn tails_that_may_become_tags_or_stops_are_held() {
        let stops = vec!["STOP".to_string()];
        let c = conv(false);
        assert_eq!(settled("Hello <thi", &stops, &c), "Hello ");
        assert_eq!(settled("Hello ST", &stops, &c), "Hello ");
        assert_eq!(settled("Hello STOP and more", &stops, &c), "Hello ");
        assert_eq!(settled("Hello \u{FFFD}", &stops, &c), "Hello ");
        assert_eq!(settled("a < b", &stops, &c), "a < b");
        assert_eq!(settled("x </", &[], &c), "x ");
        assert_eq!(settled("naïve é", &["éa".to_string()], &c), "naïve ");
    }

    #[test]
    fn partial_suffix_counts_bytes_of_the_longest_prefix() {
        assert_eq!(partial_suffix("abc</th", "</think>"), 4);
        assert_eq!(partial_suffix("abc", "</think>"), 0);
        assert_eq!(partial_suffix("<", "<think>"), 1);
        // The whole pattern is not a partial match (the split sees it).
        assert_eq!(partial_suffix("<think>", "<think>"), 0);
    }

    #[test]
    fn extension_never_takes_text_back() {
        assert_eq!(extension("ab", "abc"), "c");
        assert_eq!(extension("", "abc"), "abc");
        assert_eq!(extension("abx", "abc"), "c");
        assert_eq!(extension("héllo", "hé"), "");
    }
}
