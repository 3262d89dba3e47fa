//! Build a Hugging Face [`tokenizers::Tokenizer`] from the tokenizer metadata that a GGUF file
//! carries (`tokenizer.ggml.*`), so a bare `.gguf` is enough to run a model.
//!
//! What is supported: `tokenizer.ggml.model = "gpt2"`, i.e. GPT-2 style byte-level BPE (Llama 3,
//! Qwen 2/2.5/3, SmolLM/SmolLM2, DeepSeek-R1 distills, StarCoder, Phi-2, ...). SentencePiece
//! (`"llama"`), WordPiece, Unigram etc. return a clear "not supported yet" error; the caller can
//! then fall back to an explicit `--tokenizer tokenizer.json`.
//!
//! The reference for every rule below is llama.cpp (`src/llama-vocab.cpp`), because a GGUF file
//! means "what llama.cpp does with it":
//!
//! * **Pre-tokenization.** `tokenizer.ggml.pre` names a family of split regexes. llama.cpp applies
//!   a list of regexes one after the other, each one splitting every piece left by the previous one
//!   and keeping both the matches and the gaps between them as pieces. That is exactly a
//!   [`Sequence`] of [`Split`] pre-tokenizers with [`SplitDelimiterBehavior::Isolated`]. After the
//!   splits comes `ByteLevel(add_prefix_space = false, use_regex = false)`, which only maps bytes
//!   to the GPT-2 byte alphabet. The regexes are copied from llama.cpp (see [`pre_split_regexes`]):
//!   `smollm` (and starcoder, refact, command-r, codeshell, exaone, minerva) = isolate every
//!   `\p{N}` digit, then the GPT-2 regex; `llama-bpe`/`llama3` family = the Llama 3 regex (digits in
//!   groups of up to 3) with `ignore_merges`; `qwen2`/`deepseek-r1-qwen` family = the same regex
//!   with single digits; `gpt-2`-like names = the plain GPT-2 regex; a missing `pre` (or
//!   `"default"`) = llama.cpp's default list. An unknown `pre` name is an error rather than a silent
//!   guess, because a wrong split yields plausible-looking but wrong ids.
//! * **Special tokens.** Token types 3 (control) and 2 (unknown) become special added tokens, type
//!   4 (user-defined) become plain (non-special) added tokens — the same set llama.cpp matches
//!   whole in text when parsing specials. So `<|im_start|>` encodes to one id, and
//!   `decode(ids, skip_special_tokens = true)` drops the control tokens but keeps user-defined
//!   ones (as llama.cpp's detokenizer does with `special = false`).
//! * **End of generation** ([`GgufTokenizer::eos_ids`]): `tokenizer.ggml.eos_token_id` first, then
//!   `tokenizer.ggml.eot_token_id` / `eom_token_id` if present, then every vocabulary token whose
//!   text is one of the end-of-turn markers that chat templates close a turn with
//!   ([`END_OF_TURN_TOKENS`]: `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `<｜end▁of▁sentence｜>`,
//!   `<end_of_turn>`, ...). This is llama.cpp's "EOG" rule: a chat model whose `eos_token_id` says
//!   `<|endoftext|>` still ends its turn with `<|im_end|>`, and stopping on either is right. Those
//!   marker tokens are also made special (llama.cpp forces them to "control"). One deliberate
//!   difference: llama.cpp also stops on fill-in-the-middle markers (`<|fim_pad|>`, `<|repo_name|>`,
//!   `<|file_sep|>`, `<reponame>`, ...; for SmolLM2 its EOG set is {0, 2, 4}); those structure code
//!   files rather than end a turn, so they are not in `eos_ids` (SmolLM2: `[2, 0]`).
//! * **BOS.** `tokenizer.ggml.add_bos_token` (default: true for the Llama 3 family, false
//!   otherwise, as in llama.cpp) is exposed as [`GgufTokenizer::add_bos`]; when true a post-processor
//!   also prepends BOS on `encode(text, add_special_tokens = true)`, so both call styles match
//!   llama.cpp's `tokenize(text, add_special = true)`.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{BpeBuilder, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// A tokenizer rebuilt from GGUF metadata, plus what generation needs to know about it.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    /// `tokenizer.ggml.bos_token_id`, if the file gives one.
    pub bos_id: Option<u32>,
    /// Every id that ends generation; see the module docs for the rule. `eos_token_id` comes first.
    pub eos_ids: Vec<u32>,
    /// Whether a prompt should start with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// `tokenizer.chat_template` (a Jinja template), if present.
    pub chat_template: Option<String>,
    /// Text of the BOS token (for the chat template's `bos_token`), or "" if there is none.
    pub bos_token: String,
    /// Text of the EOS token (for the chat template's `eos_token`), or "" if there is none.
    pub eos_token: String,
}

/// Token texts that close a turn / end generation when present in the vocabulary (llama.cpp's
/// end-of-generation list, plus DeepSeek's `<｜end▁of▁sentence｜>`, which llama.cpp finds as EOT).
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<｜end▁of▁sentence｜>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
];

// GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

// The regexes below are llama.cpp's (llm_tokenizer_bpe in llama-vocab.cpp), verbatim, written as
// Rust raw strings (fancy-regex handles their lookaheads). Where llama.cpp rewrote a tokenizer.json
// regex for std::regex, its rewrite is used, so that ids match llama.cpp / ollama exactly.

/// GPT-2's split regex. (HF's ByteLevel regex adds a final `|\s+`; with isolated splitting the
/// gaps a regex leaves are pieces anyway, so the two split identically.)
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3 (also dbrx, smaug, chatglm4). Case-insensitive contractions are spelled out, as in
/// llama.cpp.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2 (also deepseek-r1-qwen, stablelm2, hunyuan, grok-2, megrez, kormo): digits one by one.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek V3 / hunyuan-dense main regex (after the number and CJK splits).
const DEEPSEEK3: &str = r"[!\x22#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o / Llama 4 / MiniMax-M2, as llama.cpp rewrote the tokenizer.json regex: its
/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]` classes become "a letter that is not a-z" (resp. A-Z), so
/// combining marks are not word characters. Checked against llama.cpp; the original HF regex
/// differs from llama.cpp on text with combining marks (e.g. a decomposed "é").
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral Tekken, llama.cpp's rewrite (same letter classes as [`GPT4O`]).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Seed-Coder.
const SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Bailing MoE (llama.cpp's greedy stand-in for the original possessive quantifiers).
const BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// How llama.cpp pre-tokenizes for a `tokenizer.ggml.pre` value: the split regexes, applied in
/// order, and whether whole pieces found in the vocabulary skip the merges (`ignore_merges`).
/// `None` / `"default"` gives llama.cpp's default list; an unknown name is an error.
pub fn pre_split_regexes(pre: Option<&str>) -> Result<(Vec<&'static str>, bool)> {
    let Some(pre) = pre else {
        return Ok((default_regexes(), false));
    };
    Ok(match pre {
        "default" => (default_regexes(), false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => (vec![LLAMA3], true),
        "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => (vec![LLAMA3], false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "megrez" | "stablelm2" | "hunyuan" | "grok-2" => {
            (vec![QWEN2], false)
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => {
            (vec![GPT2], false)
        }
        "deepseek-v3" | "hunyuan-dense" => {
            (vec![r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3], false)
        }
        "gpt-4o" | "llama4" | "minimax-m2" => (vec![GPT4O], false),
        "tekken" => (vec![TEKKEN], true),
        "seed-coder" => (vec![SEED_CODER], false),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => (vec![BAILINGMOE], false),
        other => bail!(
            "not supported yet: tokenizer.ggml.pre = {other:?} (unknown pre-tokenizer); \
             pass --tokenizer tokenizer.json"
        ),
    })
}

fn default_regexes() -> Vec<&'static str> {
    vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]
}

/// Whether llama.cpp adds BOS by default for this pre-tokenizer (before `add_bos_token` is read).
fn default_add_bos(pre: Option<&str>) -> bool {
    matches!(
        pre,
        Some(
            "llama3"
                | "llama-v3"
                | "llama-bpe"
                | "falcon3"
                | "falcon-h1"
                | "pixtral"
                | "midm-2.0"
                | "lfm2"
                | "tekken"
        )
    )
}

fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a Value> {
    content.metadata.get(key)
}

/// An integer (or a bool, as 0/1) that fits an i64.
fn value_as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Bool(x) => Some(*x as i64),
        v => super::gguf::integer(v).and_then(|x| i64::try_from(x).ok()),
    }
}

fn meta_str(content: &Content, key: &str) -> Result<Option<String>> {
    match meta(content, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => bail!(
            "GGUF metadata {key} should be a string, found {:?}",
            v.value_type()
        ),
    }
}

fn meta_bool(content: &Content, key: &str) -> Result<Option<bool>> {
    match meta(content, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => match value_as_i64(v) {
            Some(x) => Ok(Some(x != 0)),
            None => bail!(
                "GGUF metadata {key} should be a bool, found {:?}",
                v.value_type()
            ),
        },
    }
}

/// A token id from the metadata, ignored (as llama.cpp does) when out of range.
fn meta_token_id(content: &Content, key: &str, n_vocab: usize) -> Result<Option<u32>> {
    match meta(content, key) {
        None => Ok(None),
        Some(v) => {
            let id = value_as_i64(v)
                .ok_or_else(|| anyhow!("GGUF metadata {key} should be an integer"))?;
            if id < 0 || id as usize >= n_vocab {
                eprintln!(
                    "warning: ignoring GGUF {key} = {id}: not a token id (vocab size {n_vocab})"
                );
                Ok(None)
            } else {
                Ok(Some(id as u32))
            }
        }
    }
}

fn meta_string_array(content: &Content, key: &str) -> Result<Option<Vec<String>>> {
    super::gguf::array(content, key, "strings", |v| match v {
        Value::String(s) => Some(s.clone()),
        _ => None,
    })
}

fn meta_int_array(content: &Content, key: &str) -> Result<Option<Vec<i64>>> {
    super::gguf::array(content, key, "integers", value_as_i64)
}

/// Build the tokenizer described by a GGUF file's `tokenizer.*` metadata.
pub fn from_gguf(content: &Content) -> Result<GgufTokenizer> {
    let model = meta_str(content, "tokenizer.ggml.model")?;
    let has_tokens = content.metadata.contains_key("tokenizer.ggml.tokens");
    let model = match model {
        Some(m) => m,
        None if !has_tokens => bail!(
            "this GGUF file has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens \
             metadata); pass --tokenizer tokenizer.json"
        ),
        None => bail!(
            "this GGUF file has tokenizer.ggml.tokens but no tokenizer.ggml.model, so its \
             tokenizer type is unknown; pass --tokenizer tokenizer.json"
        ),
    };
    match model.as_str() {
        "gpt2" => {}
        "none" | "no_vocab" => bail!(
            "this GGUF file has no tokenizer (tokenizer.ggml.model = {model:?}); \
             pass --tokenizer tokenizer.json"
        ),
        other => bail!(
            "not supported yet: tokenizer.ggml.model = {other}; pass --tokenizer tokenizer.json"
        ),
    }

    let mut tokens = meta_string_array(content, "tokenizer.ggml.tokens")?.ok_or_else(|| {
        anyhow!(
            "this GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens is missing); \
             pass --tokenizer tokenizer.json"
        )
    })?;
    if tokens.is_empty() {
        bail!("GGUF tokenizer.ggml.tokens is empty; pass --tokenizer tokenizer.json");
    }
    let n_vocab = tokens.len();
    let token_types = meta_int_array(content, "tokenizer.ggml.token_type")?;
    if let Some(tt) = &token_types {
        if tt.len() != n_vocab {
            bail!(
                "GGUF tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n_vocab}",
                tt.len()
            );
        }
    }
    let merges = meta_string_array(content, "tokenizer.ggml.merges")?
        .ok_or_else(|| anyhow!("GGUF gpt2 tokenizer has no tokenizer.ggml.merges"))?;
    let pre = meta_str(content, "tokenizer.ggml.pre")?;
    let (regexes, ignore_merges) = pre_split_regexes(pre.as_deref())?;

    // Vocabulary, exactly as the file spells it: normal tokens in the GPT-2 byte alphabet,
    // control / user-defined ones as raw text (which the ByteLevel decoder passes through).
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n_vocab);
    for (id, tok) in tokens.iter_mut().enumerate() {
        if tok.is_empty() {
            // llama.cpp does the same, so that every id keeps a distinct text.
            *tok = format!("[EMPTY_{id}]");
        }
        if let Some(prev) = vocab.insert(tok.clone(), id as u32) {
            bail!("GGUF vocabulary lists token {tok:?} twice (ids {prev} and {id})");
        }
    }

    // Merges are "left right"; llama.cpp splits at the first space after the first character.
    // A merge whose parts or result are not in the vocabulary can never fire in llama.cpp, and
    // `tokenizers` rejects it, so it is dropped.
    let mut merge_pairs = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    for m in &merges {
        let split_at = m
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| i)
            .ok_or_else(|| anyhow!("malformed GGUF merge {m:?}: no space"))?;
        let (a, b) = (&m[..split_at], &m[split_at + 1..]);
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        {
            merge_pairs.push((a.to_string(), b.to_string()));
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        eprintln!("warning: dropped {dropped} GGUF merges whose tokens are not in the vocabulary");
    }

    let bpe = BpeBuilder::new()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merge_pairs)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| anyhow!("building the BPE model from GGUF metadata: {e}"))?;

    let mut pieces: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for re in &regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("compiling pre-tokenizer regex {re:?}: {e}"))?;
        pieces.push(split.into());
    }
    pieces.push(ByteLevel::new(false, true, false).into());

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pieces)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, false)));

    // Special ids.
    let bos_id = meta_token_id(content, "tokenizer.ggml.bos_token_id", n_vocab)?;
    let eos_id = meta_token_id(content, "tokenizer.ggml.eos_token_id", n_vocab)?;
    let eot_id = meta_token_id(content, "tokenizer.ggml.eot_token_id", n_vocab)?;
    let eom_id = meta_token_id(content, "tokenizer.ggml.eom_token_id", n_vocab)?;

    // End of generation: eos, eot, eom, then the end-of-turn markers present in the vocabulary.
    let mut eos_ids: Vec<u32> = Vec::new();
    fn push(ids: &mut Vec<u32>, id: u32) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    for id in [eos_id, eot_id, eom_id].into_iter().flatten() {
        push(&mut eos_ids, id);
    }
    let token_id = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let harmony = token_id("<|return|>").is_some() && token_id("<|call|>").is_some();
    let mut marker_ids: Vec<u32> = END_OF_TURN_TOKENS
        .iter()
        // gpt-oss (o200k_harmony): `<|end|>` closes a message, not the generation (as in llama.cpp).
        .filter(|t| !(harmony && **t == "<|end|>"))
        .filter_map(|t| token_id(t))
        .collect();
    marker_ids.sort_unstable();
    for id in &marker_ids {
        push(&mut eos_ids, *id);
    }

    // Added tokens: control / unknown (and end-of-turn markers) special, user-defined plain.
    let mut special = Vec::new();
    let mut plain = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        let ty = token_types.as_ref().map_or(1, |tt| tt[id]);
        let is_marker = marker_ids.contains(&(id as u32));
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_UNKNOWN || is_marker {
            special.push(AddedToken::from(tok.clone(), true).normalized(false));
        } else if ty == TOKEN_TYPE_USER_DEFINED {
            plain.push(AddedToken::from(tok.clone(), false).normalized(false));
        }
    }
    tokenizer.add_special_tokens(special).map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
    tokenizer.add_tokens(plain).map_err(|e| anyhow::anyhow!("adding user-defined tokens: {e}"))?;
    if tokenizer.get_vocab_size(true) != n_vocab {
        bail!(
            "internal error: tokenizer built from GGUF has {} tokens, the file has {n_vocab}",
            tokenizer.get_vocab_size(true)
        );
    }

    let add_bos = meta_bool(content, "tokenizer.ggml.add_bos_token")?
        .unwrap_or_else(|| default_add_bos(pre.as_deref()));
    let add_eos = meta_bool(content, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos_for_template = bos_id.filter(|_| add_bos);
    let eos_for_template = eos_id.filter(|_| add_eos);
    if bos_for_template.is_some() || eos_for_template.is_some() {
        let mut single: Vec<String> = Vec::new();
        let mut pair: Vec<String> = Vec::new();
        let mut specials: Vec<SpecialToken> = Vec::new();
        let special = |name: &str, id: u32| SpecialToken::new(name.into(), vec![id], vec![tokens[id as usize].clone()]).map_err(|e| anyhow!("{name} template: {e}"));
        if let Some(id) = bos_for_template {
            single.push("BOS".into());
            pair.push("BOS".into());
            specials.push(special("BOS", id)?);
        }
        single.push("$A".into());
        pair.push("$A".into());
        pair.push("$B:1".into());
        if let Some(id) = eos_for_template {
            single.push("EOS".into());
            pair.push("EOS:1".into());
            specials.push(special("EOS", id)?);
        }
        let post = TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| anyhow!("BOS/EOS template: {e}"))?
            .try_pair(pair)
            .map_err(|e| anyhow!("BOS/EOS template: {e}"))?
            .special_tokens(specials)
            .build()
            .map_err(|e| anyhow!("BOS/EOS template: {e}"))?;
        tokenizer.with_post_processor(Some(post));
    }

    let chat_template = meta_str(content, "tokenizer.chat_template")?;
    let text_of = |id: Option<u32>| id.map(|i| tokens[i as usize].clone()).unwrap_or_default();
    Ok(GgufTokenizer {
        tokenizer,
        bos_id,
        bos_token: text_of(bos_id),
        eos_token: text_of(eos_id),
        eos_ids,
        add_bos,
        chat_template,
    })
}

/// Read a GGUF file's header and build its tokenizer (convenience for callers and tests).
pub fn from_gguf_file(path: impl AsRef<std::path::Path>) -> Result<GgufTokenizer> {
    let path = path.as_ref();
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = Content::read(&mut file)
        .map_err(|e| anyhow!("reading GGUF header of {}: {e}", path.display()))?;
    from_gguf(&content)
}

/// Tokenizes a rendered prompt: the template writes special tokens as text, so they are
/// parsed as tokens, and `bos` (id, text) is put first unless the text already starts with it.
pub fn encode_prompt(tokenizer: &tokenizers::Tokenizer, bos: Option<(u32, &str)>, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing a prompt: {e}"))?;
    let mut ids = Vec::with_capacity(enc.len() + 1);
    if let Some((bos, bos_text)) = bos {
        if !text.starts_with(bos_text) {
            ids.push(bos);
        }
    }
    ids.extend_from_slice(enc.get_ids());
    Ok(ids)
}

/// The most bytes of text one token can stand for, as an upper bound: the longest vocabulary
/// entry in UTF-8 bytes (byte-level and SentencePiece vocabularies spell each byte of text
/// with one or more bytes), times 4 for normalizers that shorten text (NFKC turns the
/// 3-byte ligature "ﬁ" into "fi"). A text longer than `limit` times this has more than
/// `limit` tokens, which is known without tokenizing it.
pub fn max_text_bytes_per_token(tokenizer: &tokenizers::Tokenizer) -> usize {
    4 * tokenizer.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;
    use std::path::PathBuf;

    const SMOLLM2_DEFAULT: &str = "/root/.cache/bsa/models/SmolLM2-135M-Instruct.Q4_1.gguf";
    const SMOLLM2_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

    /// The real SmolLM2 GGUF: `$BSA_SMOLLM2_GGUF` if set, else `~/.cache/bsa/models/…` or the
    /// /root path. Absent: a loud SKIPPED note, or a panic when `BSA_REQUIRE_MODEL=1`.
    pub(crate) fn smollm2_gguf(test: &str) -> Option<PathBuf> {
        // An explicit BSA_SMOLLM2_GGUF is the only place looked at.
        let candidates: Vec<PathBuf> = match std::env::var_os("BSA_SMOLLM2_GGUF") {
            Some(p) => vec![PathBuf::from(p)],
            None => std::env::var_os("HOME")
                .map(|h| {
                    PathBuf::from(h)
                        .join(".cache/bsa/models")
                        .join(SMOLLM2_NAME)
                })
                .into_iter()
                .chain([PathBuf::from(SMOLLM2_DEFAULT)])
                .collect(),
        };
        if let Some(found) = candidates.iter().find(|p| p.is_file()) {
            return Some(found.clone());
        }
        let msg = format!(
            "SKIPPED: {test}: SmolLM2 GGUF absent (looked at {candidates:?}; set BSA_SMOLLM2_GGUF)"
        );
        if std::env::var("BSA_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
            panic!("BSA_REQUIRE_MODEL=1 but {msg}");
        }
        eprintln!("\n*** {msg} ***\n");
        None
    }

    struct Case {
        text: String,
        ids: Vec<u32>,
        special: bool,
        decoded_skip_special: String,
    }

    fn fixture() -> (String, Vec<Case>) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/smollm2_tokens.json"
        );
        let raw = std::fs::read_to_string(path).expect("read smollm2_tokens.json fixture");
        let v: serde_json::Value = serde_json::from_str(&raw).expect("fixture is JSON");
        let note = v["note"].as_str().expect("fixture note").to_string();
        let cases = v["cases"]
            .as_array()
            .expect("fixture cases")
            .iter()
            .map(|c| Case {
                text: c["text"].as_str().unwrap().to_string(),
                ids: c["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_u64().unwrap() as u32)
                    .collect(),
                special: c["special"].as_bool().unwrap(),
                decoded_skip_special: c["decoded_skip_special"].as_str().unwrap().to_string(),
            })
            .collect();
        (note, cases)
    }

    /// `tests/fixtures/smollm2_tokens.json` holds ids from llama.cpp's own tokenizer
    /// (llama-cpp-python, `Llama(vocab_only=True).tokenize(text, add_bos=False, special=True)`) on
    /// the same GGUF, and its `detokenize(ids, special=False)` as `decoded_skip_special`; its
    /// `note` says more and its `generator` field holds the Python that wrote it.
    #[test]
    fn smollm2_ids_match_reference() {
        let Some(path) = smollm2_gguf("smollm2_ids_match_reference") else {
            return;
        };
        let tok = from_gguf_file(&path).unwrap();
        let (note, cases) = fixture();
        assert!(cases.len() >= 25, "fixture too small: {}", cases.len());
        assert!(!note.is_empty());
        let mut failures = Vec::new();
        for c in &cases {
            let enc = tok.tokenizer.encode(c.text.as_str(), false).unwrap();
            if enc.get_ids() != c.ids.as_slice() {
                failures.push(format!(
                    "{:?}\n   want {:?}\n   got  {:?} {:?}",
                    c.text,
                    c.ids,
                    enc.get_ids(),
                    enc.get_tokens()
                ));
                continue;
            }
            // add_bos is false for SmolLM2, so the special-token path adds nothing.
            let with_specials = tok.tokenizer.encode(c.text.as_str(), true).unwrap();
            assert_eq!(with_specials.get_ids(), c.ids.as_slice(), "{:?}", c.text);
            let round = tok.tokenizer.decode(&c.ids, false).unwrap();
            assert_eq!(round, c.text, "decode(encode(s)) != s");
            let skipped = tok.tokenizer.decode(&c.ids, true).unwrap();
            assert_eq!(
                skipped, c.decoded_skip_special,
                "skip_special_tokens decode of {:?}",
                c.text
            );
            if !c.special {
                assert_eq!(skipped, c.text);
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases differ:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        eprintln!(
            "smollm2: {} reference cases match ({})",
            cases.len(),
            path.display()
        );
    }

    #[test]
    fn smollm2_metadata() {
        let Some(path) = smollm2_gguf("smollm2_metadata") else {
            return;
        };
        let tok = from_gguf_file(&path).unwrap();
        assert_eq!(tok.tokenizer.get_vocab_size(true), 49152);
        assert_eq!(tok.bos_id, Some(1));
        assert_eq!(tok.bos_token, "<|im_start|>");
        assert_eq!(tok.eos_token, "<|im_end|>");
        assert!(!tok.add_bos);
        // eos_token_id first, then the end-of-turn markers found in the vocabulary.
        assert_eq!(tok.eos_ids, vec![2, 0]);
        let t = &tok.tokenizer;
        for (text, id) in [
            ("<|endoftext|>", 0),
            ("<|im_start|>", 1),
            ("<|im_end|>", 2),
            ("<empty_output>", 16),
        ] {
            assert_eq!(t.encode(text, false).unwrap().get_ids(), &[id], "{text}");
            assert_eq!(t.token_to_id(text), Some(id));
        }
        let tpl = tok
            .chat_template
            .as_deref()
            .expect("SmolLM2 GGUF has a chat template");
        assert!(
            tpl.contains("<|im_start|>") && tpl.contains("<|im_end|>"),
            "{tpl}"
        );
        assert!(tpl.contains("add_generation_prompt"), "{tpl}");
    }

    // ---- synthetic GGUF metadata: run without the model ----

    fn byte_alphabet() -> Vec<String> {
        // GPT-2's bytes_to_unicode, in byte order.
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
        pairs.sort();
        pairs
            .into_iter()
            .map(|(_, c)| char::from_u32(c).unwrap().to_string())
            .collect()
    }

    fn content(meta: Vec<(&str, Value)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strings(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A tiny byte-level vocabulary: 256 bytes, "ab", "Ġab", "12", then two control tokens.
    fn tiny(pre: Option<&str>, extra: Vec<(&str, Value)>) -> Content {
        let mut toks = byte_alphabet();
        toks.extend(
            [
                "ab",
                "Ġa",
                "Ġab",
                "12",
                "<|im_start|>",
                "<|im_end|>",
                "<think>",
            ]
            .map(String::from),
        );
        let n = toks.len();
        let mut types = vec![Value::I32(1); n];
        types[n - 3] = Value::I32(3);
        types[n - 2] = Value::I32(3);
        types[n - 1] = Value::I32(4);
        let mut meta = vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(toks.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            (
                "tokenizer.ggml.merges",
                strings(&["Ġ a", "a b", "Ġa b", "1 2", "x y"]),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(n as u32 - 3)),
            ("tokenizer.ggml.eos_token_id", Value::U32(n as u32 - 2)),
        ];
        if let Some(p) = pre {
            meta.push(("tokenizer.ggml.pre", Value::String(p.into())));
        }
        meta.extend(extra);
        content(meta)
    }

    fn ids(t: &GgufTokenizer, s: &str) -> Vec<u32> {
        t.tokenizer.encode(s, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn synthetic_byte_level_bpe() {
        let t = from_gguf(&tiny(Some("smollm"), vec![])).unwrap();
        let (ab, g_ab, twelve, start, end, think) = (256, 258, 259, 260, 261, 262);
        assert_eq!(ids(&t, "ab ab"), vec![ab, g_ab]);
        // smollm isolates digits, so "12" never merges.
        assert_eq!(ids(&t, "12"), vec![b'1' as u32, b'2' as u32]);
        assert_eq!(
            ids(&t, "<|im_start|>ab<think><|im_end|>"),
            vec![start, ab, think, end]
        );
        let all = ids(&t, "<|im_start|>ab<think><|im_end|>");
        assert_eq!(t.tokenizer.decode(&all, true).unwrap(), "ab<think>");
        assert_eq!(
            t.tokenizer.decode(&all, false).unwrap(),
            "<|im_start|>ab<think><|im_end|>"
        );
        assert_eq!(t.eos_ids, vec![end]);
        assert!(!t.add_bos);
        // gpt-2 pre: digits merge.
        let t = from_gguf(&tiny(Some("gpt-2"), vec![])).unwrap();
        assert_eq!(ids(&t, "12"), vec![twelve]);
        // Unicode round trip through the byte alphabet.
        let s = "héllo 世界 😀\n\t";
        let e = ids(&t, s);
        assert_eq!(t.tokenizer.decode(&e, false).unwrap(), s);
    }

    #[test]
    fn synthetic_add_bos() {
        let t = from_gguf(&tiny(Some("llama-bpe"), vec![])).unwrap();
        assert!(t.add_bos, "llama3 family defaults to add_bos");
        assert_eq!(
            t.tokenizer.encode("ab", true).unwrap().get_ids(),
            &[260, 256]
        );
        assert_eq!(t.tokenizer.encode("ab", false).unwrap().get_ids(), &[256]);
        let t = from_gguf(&tiny(
            Some("llama-bpe"),
            vec![("tokenizer.ggml.add_bos_token", Value::Bool(false))],
        ))
        .unwrap();
        assert!(!t.add_bos);
        assert_eq!(t.tokenizer.encode("ab", true).unwrap().get_ids(), &[256]);
    }

    #[test]
    fn every_known_pre_builds() {
        let names = [
            "default",
            "llama3",
            "llama-bpe",
            "dbrx",
            "smaug-bpe",
            "qwen2",
            "deepseek-r1-qwen",
            "smollm",
            "starcoder",
            "gpt-2",
            "mpt",
            "olmo",
            "deepseek-v3",
            "gpt-4o",
            "llama4",
            "tekken",
            "seed-coder",
            "bailingmoe",
            "chatglm-bpe",
        ];
        for name in names {
            let t = from_gguf(&tiny(Some(name), vec![])).unwrap_or_else(|e| panic!("{name}: {e}"));
            let s = "Hello, I'm 12345 — 中文 😀\n\n  x";
            let e = ids(&t, s);
            assert_eq!(t.tokenizer.decode(&e, false).unwrap(), s, "{name}");
        }
        assert!(
            from_gguf(&tiny(None, vec![])).is_ok(),
            "missing pre falls back to default"
        );
    }

    #[test]
    fn pre_regex_splits() {
        // Spot-check the regexes through tokenizers' Split (pieces, not ids).
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let pieces = |pre: &str, s: &str| -> Vec<String> {
            let (res, _) = pre_split_regexes(Some(pre)).unwrap();
            let seq: Vec<PreTokenizerWrapper> = res
                .iter()
                .map(|r| {
                    Split::new(
                        SplitPattern::Regex(r.to_string()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .unwrap()
                    .into()
                })
                .collect();
            let mut p = PreTokenizedString::from(s);
            Sequence::new(seq).pre_tokenize(&mut p).unwrap();
            p.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(s, _, _)| s.to_string())
                .collect()
        };
        assert_eq!(pieces("smollm", "ab 123"), ["ab", " ", "1", "2", "3"]);
        assert_eq!(pieces("llama-bpe", "ab 12345"), ["ab", " ", "123", "45"]);
        assert_eq!(pieces("qwen2", "I'M 12"), ["I", "'M", " ", "1", "2"]);
        assert_eq!(pieces("gpt-2", "I'm  x 12"), ["I", "'m", " ", " x", " 12"]);
        assert_eq!(pieces("llama-bpe", "a\n\n b"), ["a", "\n\n", " b"]);
    }

    #[test]
    fn errors_are_clear() {
        let none = content(vec![(
            "general.architecture",
            Value::String("llama".into()),
        )]);
        let e = from_gguf(&none).err().unwrap().to_string();
        assert!(
            e.contains("no tokenizer") && e.contains("--tokenizer tokenizer.json"),
            "{e}"
        );

        let spm = content(vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&["<unk>", "<s>", "</s>"])),
        ]);
        let e = from_gguf(&spm).err().unwrap().to_string();
        assert!(
            e.contains("not supported yet: tokenizer.ggml.model = llama"),
            "{e}"
        );

        let e = from_gguf(&tiny(Some("some-new-model"), vec![]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tokenizer.ggml.pre") && e.contains("some-new-model"),
            "{e}"
        );
    }
}
