//! Structured output: a grammar per sequence, applied as a token mask at every decode step.
//!
//! The grammar engine is [`llguidance`] (the one behind llama.cpp, vLLM and SGLang): a
//! grammar in its Lark dialect (docs/syntax.md of the llguidance repository) is compiled
//! once against the model's vocabulary ([`GrammarCompiler::compile`]) and every sequence
//! that decodes under it gets its own parser state ([`Guide`]). Before each token the
//! guide sets every token the grammar does not allow to `-inf` in the sequence's logits
//! row, so the sampler can only pick an allowed one; after it, the token advances the
//! parser. A sequence ends when the grammar is complete ([`Guide::is_complete`]).
//!
//! A grammar may carry a [`Choice`]: a position (right after a given run of tokens, or
//! the first token) where the text continues with one of a few options (a judge's labels).
//! There the guide records the probability of each option from that step's logits: the
//! softmax of the raw logits (temperature 1) over the allowed tokens, each allowed token
//! counted for the one option its bytes begin, renormalised over the options. That is the
//! exact probability of each option under the constrained model when every allowed token
//! begins exactly one option (options with distinct first bytes, as every built-in
//! label set has); otherwise no probabilities are recorded, never approximate ones.
//!
//! Masking runs on the host: a constrained row is copied from the device, masked and
//! sampled by the exact CPU sampler (as llama.cpp does); unconstrained rows are untouched.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

/// The options of a [`Choice`] and where they start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The tokens right before the choice (the grammar forces them); empty: the choice is
    /// the first thing decoded (the prompt ends where it starts).
    pub after: Vec<u32>,
    /// The option texts, in the order their probabilities are reported.
    pub options: Vec<String>,
}

/// The tokenizer as llguidance sees it: every token's bytes in a trie, and tokenization
/// by the model's own tokenizer (so forced text is tokenized as the model would).
struct HfTokenizerEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for HfTokenizerEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Grammar text is UTF-8 except in a split multi-byte character, which the trie's
        // greedy tokenization handles exactly.
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(e) => e.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Every token's bytes, by id, as llguidance reads them from the tokenizer's vocabulary
/// (byte-level BPE or byte fallback); a special token is its text after
/// [`TokTrie::SPECIAL_TOKEN_MARKER`].
///
/// Errors: a tokenizer that does not serialise, or whose token bytes cannot be recovered
/// (neither byte-level BPE nor byte fallback).
pub fn vocabulary_bytes(tokenizer: &tokenizers::Tokenizer) -> Result<Vec<Vec<u8>>> {
    let json: serde_json::Value = serde_json::from_str(&tokenizer.to_string(false).map_err(|e| anyhow!("serialising the tokenizer: {e}"))?)?;
    llguidance::token_bytes_from_tokenizer_json(&json)
}

/// Compiles grammars against one model's vocabulary. Building it reads every token's
/// bytes and builds llguidance's token trie (about half a second for SmolLM2's 49k tokens
/// on 2 CPU cores); build one per model, when it is first needed.
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").field("vocab_size", &self.vocab_size).finish()
    }
}

impl GrammarCompiler {
    /// For `tokenizer` and a model whose logits rows have `vocab_size` entries (at least
    /// the tokenizer's vocabulary; padding entries are never allowed). `eos` is the token
    /// a complete grammar allows to end the sequence.
    ///
    /// Errors: a tokenizer whose token bytes cannot be recovered (neither byte-level BPE
    /// nor byte fallback).
    pub fn new(tokenizer: &tokenizers::Tokenizer, vocab_size: usize, eos: u32) -> Result<GrammarCompiler> {
        let mut words = vocabulary_bytes(tokenizer).context("reading the bytes of every token for structured output")?;
        let vocab_size = vocab_size.max(words.len());
        words.resize(vocab_size, Vec::new());
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(HfTokenizerEnv { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env)?;
        // Grammar warnings go to the caller as errors, not to stderr.
        factory.quiet();
        Ok(GrammarCompiler { factory: Arc::new(factory), vocab_size })
    }

    /// For a loaded model: its tokenizer, its logits width, its first end-of-sequence token.
    pub fn for_model(m: &crate::engine::load::LoadedModel) -> Result<GrammarCompiler> {
        GrammarCompiler::new(&m.tokenizer, m.config.vocab_size, m.eos_ids.first().copied().unwrap_or(0))
    }

    /// The token ids of `text` as the model's tokenizer writes it.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.factory.tok_env().tokenize(text)
    }

    /// Compiles a grammar in llguidance's Lark dialect, with an optional choice to watch.
    ///
    /// Errors: a grammar that does not compile (the message is llguidance's), an empty
    /// choice, or a choice whose `after` tokens are out of the vocabulary.
    pub fn compile(&self, lark: &str, choice: Option<Choice>) -> Result<Arc<Grammar>> {
        if let Some(c) = &choice {
            ensure!(!c.options.is_empty(), "a choice needs at least one option");
            ensure!(c.after.iter().all(|&t| (t as usize) < self.vocab_size), "a choice's tokens are out of the vocabulary");
        }
        self.build(TopLevelGrammar::from_lark(lark.to_string()), &format!("the grammar\n{lark}"), choice, lark.to_string())
    }

    /// Compiles a JSON schema (draft 2020-12 as llguidance supports it) into a grammar
    /// whose texts are exactly the JSON documents the schema accepts. Unless the schema
    /// says otherwise in its `x-guidance` options, whitespace is fixed (`, ` and `: `
    /// between items, no other), so a model cannot loop on blank space.
    ///
    /// Errors: a schema llguidance cannot compile (its message).
    pub fn compile_json_schema(&self, schema: &serde_json::Value) -> Result<Arc<Grammar>> {
        let mut schema = schema.clone();
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        }
        self.build(TopLevelGrammar::from_json_schema(schema), "the JSON schema", None, "(a JSON schema)".into())
    }

    /// The parser of `grammar`, checked; `what` names it in errors.
    fn build(&self, grammar: TopLevelGrammar, what: &str, choice: Option<Choice>, source: String) -> Result<Arc<Grammar>> {
        let parser = self.factory.create_parser(grammar).with_context(|| format!("compiling {what}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            bail!("compiling {what}: {e}");
        }
        Ok(Arc::new(Grammar { matcher, choice, source }))
    }
}

/// A compiled grammar: the parser state every sequence under it starts from.
pub struct Grammar {
    matcher: Matcher,
    choice: Option<Choice>,
    source: String,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("source", &self.source).field("choice", &self.choice).finish()
    }
}

impl Grammar {
    /// A fresh parser state for one sequence.
    pub fn guide(&self) -> Guide {
        Guide {
            matcher: self.matcher.deep_clone(),
            choice: self.choice.clone(),
            generated: Vec::new(),
            choice_probs: None,
            watched: false,
        }
    }
}

/// One sequence's position in its grammar.
pub struct Guide {
    matcher: Matcher,
    choice: Option<Choice>,
    generated: Vec<u32>,
    choice_probs: Option<Vec<f64>>,
    watched: bool,
}

impl Guide {
    /// Sets every token the grammar does not allow next to `-inf` in `logits` (one row;
    /// entries past the compiler's vocabulary are disallowed too). At the choice position,
    /// records the options' probabilities first.
    ///
    /// Errors: the grammar allows no token at all (a dead end: the parser's message).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask = self.matcher.compute_mask().map_err(|e| anyhow!("structured output: {e}"))?;
        if mask.is_zero() {
            bail!("structured output: the grammar allows no next token after {} tokens", self.generated.len());
        }
        if !self.watched && self.at_choice() {
            self.watched = true;
            self.choice_probs = self.option_probs(logits, &mask);
        }
        let covered = mask.len().min(logits.len());
        mask.iter_unset_entries(|t| {
            if t < covered {
                logits[t] = f32::NEG_INFINITY;
            }
        });
        logits[covered..].fill(f32::NEG_INFINITY);
        Ok(())
    }

    /// Advances past the sampled `token`.
    ///
    /// Errors: a token the grammar does not allow (only when the mask was not applied).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.generated.push(token);
        self.matcher.consume_token(token).map_err(|e| anyhow!("structured output: token {token}: {e}"))
    }

    /// Whether the grammar is complete and allows nothing more: the sequence ends here.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The options' probabilities at the choice, in [`Choice::options`] order, once the
    /// choice was reached (None before, without a choice, or when an allowed token there
    /// began more than one option).
    pub fn choice_probs(&self) -> Option<&[f64]> {
        self.choice_probs.as_deref()
    }

    /// Right after the choice's `after` tokens (with none: before the first token).
    fn at_choice(&self) -> bool {
        self.choice.as_ref().is_some_and(|c| match c.after.is_empty() {
            true => self.generated.is_empty(),
            false => self.generated.ends_with(&c.after),
        })
    }

    fn option_probs(&self, logits: &[f32], mask: &llguidance::toktrie::SimpleVob) -> Option<Vec<f64>> {
        let choice = self.choice.as_ref()?;
        let env = self.matcher.tok_env().ok()?;
        let trie = env.tok_trie();
        let max = mask.iter().filter_map(|t| logits.get(t as usize)).copied().filter(|l| l.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return None;
        }
        let mut mass = vec![0.0f64; choice.options.len()];
        for t in mask.iter() {
            let Some(&l) = logits.get(t as usize) else { continue };
            if !l.is_finite() {
                continue;
            }
            let bytes = trie.token(t);
            // A token that begins no option (end of sequence) carries no option's mass.
            let begins: Vec<usize> = choice
                .options
                .iter()
                .enumerate()
                .filter(|(_, o)| !bytes.is_empty() && (o.as_bytes().starts_with(bytes) || bytes.starts_with(o.as_bytes())))
                .map(|(i, _)| i)
                .collect();
            match begins.as_slice() {
                [] => {}
                [i] => mass[*i] += ((l as f64) - (max as f64)).exp(),
                _ => return None,
            }
        }
        let total: f64 = mass.iter().sum();
        (total > 0.0).then(|| mass.iter().map(|m| m / total).collect())
    }
}

/// A Lark string literal for `text` (quotes, backslashes and control characters escaped).
pub fn lark_literal(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// A Lark expression for exactly the tokens `ids`, in order (`<[12]><[34]>`): forced text
/// whose token boundaries are fixed.
pub fn lark_tokens(ids: &[u32]) -> String {
    ids.iter().map(|t| format!("<[{t}]>")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tokenizer::{from_gguf_file, tests::smollm2_gguf};

    /// SmolLM2's tokenizer and a compiler over its 49152 tokens.
    fn smollm2(test: &str) -> Option<(tokenizers::Tokenizer, GrammarCompiler)> {
        let t = from_gguf_file(smollm2_gguf(test)?).unwrap();
        let c = GrammarCompiler::new(&t.tokenizer, 49152, t.eos_ids[0]).unwrap();
        Some((t.tokenizer, c))
    }

    /// Greedy decoding of `logits_for(step)` under `g`: the text, the guide at the end.
    fn decode(g: &Grammar, tok: &tokenizers::Tokenizer, mut logits_for: impl FnMut(usize) -> Vec<f32>, max: usize) -> (String, Guide) {
        let mut guide = g.guide();
        let mut out = Vec::new();
        for step in 0..max {
            let mut row = logits_for(step);
            guide.mask(&mut row).unwrap();
            let t = crate::engine::sampler::sample_row(&row, &crate::engine::sampler::SamplingParams::greedy(), 0.5);
            if t == 2 || t == 0 {
                break;
            }
            guide.commit(t).unwrap();
            out.push(t);
            if guide.is_complete() {
                break;
            }
        }
        (tok.decode(&out, false).unwrap(), guide)
    }

    #[test]
    fn every_decoding_under_a_label_grammar_is_a_label() {
        let Some((tok, c)) = smollm2("every_decoding_under_a_label_grammar_is_a_label") else { return };
        let g = c.compile("start: label \"\\\"}\"\nlabel: \"Safe\" | \"Unsafe\"\n", Some(Choice { after: vec![], options: vec!["Safe".into(), "Unsafe".into()] })).unwrap();
        // Random logits, many seeds: whatever the model prefers, the text is a label.
        let mut rng = crate::engine::test_rng::TestRng(7);
        for _ in 0..20 {
            let (text, guide) = decode(&g, &tok, |_| rng.vec(49152, 10.0), 12);
            assert!(text == "Safe\"}" || text == "Unsafe\"}", "{text:?}");
            let p = guide.choice_probs().expect("labels with distinct first bytes have probabilities");
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9 && p.iter().all(|&x| x > 0.0), "{p:?}");
        }
    }

    #[test]
    fn label_probabilities_are_the_allowed_tokens_mass_per_label() {
        let Some((tok, c)) = smollm2("label_probabilities_are_the_allowed_tokens_mass_per_label") else { return };
        let g = c.compile("start: label \"\\\"}\"\nlabel: \"Safe\" | \"Unsafe\"\n", Some(Choice { after: vec![], options: vec!["Safe".into(), "Unsafe".into()] })).unwrap();
        let id = |s: &str| tok.token_to_id(s).unwrap() as usize;
        // Only "Safe" (logit 2) and "Unsafe"'s first token (logit 0) stand out; every other
        // allowed token (prefixes such as "S", "Un") is far below.
        let (safe, uns) = (id("Safe"), c.tokenize("Unsafe")[0] as usize);
        let mut row = vec![-30.0f32; 49152];
        row[safe] = 2.0;
        row[uns] = 0.0;
        let mut guide = g.guide();
        guide.mask(&mut row.clone()).unwrap();
        let p = guide.choice_probs().unwrap();
        let expect = 1.0 / (1.0 + (-2.0f64).exp());
        assert!((p[0] - expect).abs() < 1e-6, "{p:?} vs {expect}");
        // Tokens outside the grammar never count, however likely.
        row[id("The")] = 50.0;
        let mut guide = g.guide();
        guide.mask(&mut row).unwrap();
        assert!((guide.choice_probs().unwrap()[0] - expect).abs() < 1e-6);
        assert_eq!(row[id("The")], f32::NEG_INFINITY);
        // Options that share a first byte give no probabilities rather than wrong ones.
        let shared = c.compile("start: \"No\" | \"Not\"\n", Some(Choice { after: vec![], options: vec!["No".into(), "Not".into()] })).unwrap();
        let mut guide = shared.guide();
        guide.mask(&mut vec![0.0; 49152]).unwrap();
        assert_eq!(guide.choice_probs(), None);
    }

    #[test]
    fn analysis_then_fixed_tokens_then_the_label() {
        let Some((tok, c)) = smollm2("analysis_then_fixed_tokens_then_the_label") else { return };
        let prefix = c.tokenize("{\"Safe_Ans_Check\": \"");
        let lark = format!("start: analysis {} label \"\\\"}}\"\nanalysis[max_tokens=5]: /[^{{}}]*/\nlabel: \"Safe\" | \"Unsafe\"\n", lark_tokens(&prefix));
        let g = c.compile(&lark, Some(Choice { after: prefix.clone(), options: vec!["Safe".into(), "Unsafe".into()] })).unwrap();
        // A model that only wants to ramble ("the" forever, and a brace when it can) is cut
        // at 5 analysis tokens and still ends with a label.
        let the = tok.token_to_id("the").unwrap() as usize;
        let brace = tok.token_to_id("{").unwrap() as usize;
        let (text, guide) = decode(&g, &tok, |_| {
            let mut r = vec![0.0f32; 49152];
            r[the] = 10.0;
            r[brace] = 5.0;
            r
        }, 64);
        assert!(text.starts_with("thethethethethe{\"Safe_Ans_Check\": \""), "{text:?}");
        assert!(text.ends_with("Safe\"}") , "{text:?}");
        assert!(guide.is_complete());
        assert!(guide.choice_probs().is_some());
    }

    #[test]
    fn a_grammar_that_does_not_compile_is_an_error_naming_it() {
        let Some((_, c)) = smollm2("a_grammar_that_does_not_compile_is_an_error_naming_it") else { return };
        let e = format!("{:#}", c.compile("start: undefined_rule\n", None).unwrap_err());
        assert!(e.contains("undefined_rule"), "{e}");
    }

    #[test]
    #[ignore = "a timing probe, run by hand"]
    fn mask_time() {
        let Some(path) = smollm2_gguf("mask_time") else { return };
        let t = from_gguf_file(path).unwrap();
        let start = std::time::Instant::now();
        let c = GrammarCompiler::new(&t.tokenizer, 49152, t.eos_ids[0]).unwrap();
        eprintln!("the compiler over 49152 tokens: {:?}", start.elapsed());
        let prefix = c.tokenize("{\"Safe_Ans_Check\": \"");
        let lark = format!("start: analysis {} label \"\\\"}}\"\nanalysis[max_tokens=128]: /[^{{}}]*/\nlabel: \"Safe\" | \"Unsafe\"\n", lark_tokens(&prefix));
        let g = c.compile(&lark, None).unwrap();
        let mut guide = g.guide();
        let t = std::time::Instant::now();
        let ids = c.tokenize(" The response refuses and explains why the request is harmful, so it is safe to say");
        for &id in &ids {
            guide.mask(&mut vec![0.0; 49152]).unwrap();
            guide.commit(id).unwrap();
        }
        eprintln!("{} steps: {:?} per step", ids.len(), t.elapsed() / ids.len() as u32);
    }
}
