//! Continuous batching over the paged KV cache.
//!
//! One loop, one forward per step: every running sequence contributes its next token,
//! waiting prompts contribute prefill chunks (up to a token budget), finished sequences
//! give their blocks back at once so the next prompt enters on the following step. The k
//! samples of one query share one prefill: the prompt is written once, then the block table
//! is forked k times. When the cache runs out, the youngest sequence is set aside and later
//! recomputed, so memory pressure admits fewer, never crashes.
//!
//! First come, first served: every sample has an admission order, the running list is kept
//! in that order, and preemption takes the most recently admitted sequence (running, or a
//! prompt still prefilling). A preempted sequence keeps its order, so it resumes ahead of
//! everything admitted after it and is not the next victim again (vLLM's recompute
//! preemption, with its FCFS policy).
//!
//! No sequence grows past [`SchedulerConfig::max_model_len`] tokens (prompt and generated),
//! which is never more than the cache holds, so one sequence always fits and a long sample
//! ends with [`FinishReason::Length`] instead of stopping the run. Faults stay with their
//! sample: a prompt longer than the limit, or a logits row with no finite value, ends that
//! sample with [`FinishReason::Error`] and a message, and the batch goes on.
//!
//! With prefix caching on (the [`KvCache`] default) every prompt, and every set-aside
//! sequence being recomputed, starts from the cached blocks of its prefix and prefills only
//! the rest; the blocks it fills are registered for the prompts after it. A prompt whose next
//! blocks another prompt is writing in the same step waits one step and takes them from the
//! cache instead of computing them twice.
//!
//! The scheduler knows nothing about tokenizers: stop strings are the caller's closure.
//! A sample may decode under a grammar ([`SampleSpec::grammar`]): its row is masked and
//! sampled on the host ([`super::constraint`]), and it ends when the grammar is complete.

use std::collections::{HashSet, VecDeque};

use anyhow::{bail, Result};

use super::batch::{BatchInput, SeqInput};
use super::kv_cache::{block_hashes, BlockHash, BlockTable, KvCache};
use super::models::CausalLM;
use super::constraint::{Grammar, Guide};
use crate::engine::sampler::device::sample_logits;
use crate::engine::sampler::{sample_row, SamplingParams, StreamKey, NO_TOKEN};

/// One sample to draw from a prompt.
#[derive(Debug, Clone)]
pub struct SampleSpec {
    /// The caller's handle for this sample (returned in [`Finished`]).
    pub tag: usize,
    pub params: SamplingParams,
    pub stream: StreamKey,
    pub max_new_tokens: usize,
    /// End-of-sequence tokens do not end this sample (`--ignore-eos`, for benchmarks).
    pub ignore_eos: bool,
    /// Structured output: the grammar every token must follow (None: free text).
    pub grammar: Option<std::sync::Arc<Grammar>>,
    /// Record each token's log-probability and this many most likely alternatives
    /// ([`TokenLogprob`]); None: record nothing (the default, free of cost).
    pub logprobs: Option<usize>,
}

/// A decoded token's natural-log probability under the model: the log-softmax of its raw
/// logits, before temperature or truncation (what vLLM reports by default and OpenAI's
/// `logprobs` mean), with the `top` most likely tokens there, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A prompt and the samples to draw from it; they share one prefill.
#[derive(Debug, Clone)]
pub struct PromptGroup {
    pub prompt: Vec<u32>,
    pub samples: Vec<SampleSpec>,
}

impl PromptGroup {
    /// `k` samples of each prompt with the same `params` and `max_new_tokens`, tagged 0, 1,
    /// ... in prompt order; sample s of prompt i draws from the stream
    /// `(seed, "{item_prefix}{i}", s)`. What benchmarks and tests batch.
    pub fn uniform(prompts: &[Vec<u32>], k: u32, params: SamplingParams, max_new_tokens: usize, seed: u64, item_prefix: &str) -> Vec<PromptGroup> {
        let mut tag = 0;
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| PromptGroup {
                prompt: p.clone(),
                samples: (0..k)
                    .map(|s| {
                        tag += 1;
                        SampleSpec { tag: tag - 1, params, stream: StreamKey::new(seed, &format!("{item_prefix}{i}"), s), max_new_tokens, ignore_eos: false, grammar: None, logprobs: None }
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (not included in the tokens).
    Stop,
    /// A stop string matched (the caller trims it from the text).
    StopString,
    /// max_new_tokens reached.
    Length,
    /// The sample's grammar is complete (its last token is kept).
    GrammarComplete,
    /// The sample could not go on ([`Finished::error`] says why: a prompt longer than the
    /// limit, logits with no finite value); its tokens are those sampled before.
    Error,
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub tag: usize,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_len: usize,
    /// Under a grammar with a choice: each option's probability there (see
    /// [`super::constraint::Guide::choice_probs`]).
    pub choice_probs: Option<Vec<f64>>,
    /// Why the sample ended with [`FinishReason::Error`].
    pub error: Option<String>,
    /// Times the sample was preempted (its blocks taken back, its tokens recomputed).
    pub preempted: u32,
    /// One per token of `tokens` when the sample asked for them ([`SampleSpec::logprobs`]).
    pub logprobs: Option<Vec<TokenLogprob>>,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one step (long prompts are chunked).
    pub prefill_chunk: usize,
    /// End-of-sequence token ids.
    pub eos: Vec<u32>,
    /// Most tokens of one sequence, prompt and generated (vLLM's `max_model_len`); None: as
    /// many as the KV cache holds. A value the cache cannot hold is refused at the start.
    pub max_model_len: Option<usize>,
}

/// What one step did, for progress bars and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Prompt tokens computed (prefilled) in this step.
    pub prefill_tokens: usize,
    /// Prompt tokens taken from the prefix cache instead of being computed, in this step.
    pub cached_prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Sequences preempted in this step for lack of cache blocks (their blocks freed; they
    /// are recomputed later, from their cached prefix where it is still there).
    pub preempted: usize,
    pub running: usize,
    pub waiting: usize,
    pub finished: usize,
}

/// A sequence that is decoding.
struct Seq {
    /// Admission order (first come, first served): the larger, the sooner preempted.
    order: u64,
    spec: SampleSpec,
    prompt: std::sync::Arc<Vec<u32>>,
    table: BlockTable,
    generated: Vec<u32>,
    /// One per generated token, when the spec asks for them.
    logprobs: Vec<TokenLogprob>,
    /// The grammar state of a structured sample.
    guide: Option<Guide>,
    /// See [`Finished::preempted`].
    preempted: u32,
}

/// Prompt tokens still to be written to the cache.
struct Prefill {
    tokens: Vec<u32>,
    /// Tokens in the cache: computed, or taken from the prefix cache.
    done: usize,
    table: BlockTable,
    kind: PrefillKind,
    /// Addresses of the full blocks of `tokens` (empty with prefix caching off).
    hashes: Vec<BlockHash>,
}

impl Prefill {
    /// A prefill of `tokens` that starts from their cached prefix (and the tokens it took),
    /// if the blocks it needs are among the `free` ones: the rest of the prompt's, one for
    /// each of the `samples` sequences it becomes to decode into, and the idle cached ones it
    /// takes. Otherwise `kind` comes back.
    fn admit(cache: &mut KvCache, tokens: Vec<u32>, kind: PrefillKind, samples: usize, free: usize) -> std::result::Result<(Prefill, usize), PrefillKind> {
        let bs = cache.block_size();
        let hashes = if cache.prefix_caching() { block_hashes(&tokens, bs) } else { Vec::new() };
        let cap = reusable_blocks(tokens.len(), bs);
        let hit = cache.cached_prefix(&hashes, &tokens, cap);
        let need = blocks_needed(tokens.len() - hit.blocks * bs, samples, bs) + hit.idle;
        if need > free {
            return Err(kind);
        }
        let mut table = BlockTable::new();
        let done = table.adopt_cached_prefix(cache, &hashes, &tokens, cap);
        Ok((Prefill { tokens, done, table, kind, hashes }, done))
    }

    /// The admission order of its youngest sample (see [`Seq::order`]).
    fn order(&self) -> u64 {
        match &self.kind {
            PrefillKind::Group { samples, order, .. } => order + samples.len().saturating_sub(1) as u64,
            PrefillKind::Resume(seq) => seq.order,
        }
    }

    /// Takes blocks registered since this prefill last looked (by prompts prefilled in the
    /// steps before), when it stands on a block boundary. Returns the tokens taken.
    fn adopt_more(&mut self, cache: &mut KvCache) -> usize {
        let bs = cache.block_size();
        if self.hashes.is_empty() || self.done % bs != 0 || self.table.blocks().len() * bs != self.done {
            return 0;
        }
        let taken = self.table.adopt_cached_prefix(cache, &self.hashes, &self.tokens, reusable_blocks(self.tokens.len(), bs));
        self.done += taken;
        taken
    }
}

/// Most leading blocks of a prefill of `len` tokens taken from the prefix cache: its last
/// token is always computed (its logits are what the samples draw from).
fn reusable_blocks(len: usize, block_size: usize) -> usize {
    len.saturating_sub(1) / block_size
}

enum PrefillKind {
    /// A new prompt: when written, its samples draw their first tokens from its logits.
    /// Its samples' admission orders are `order`, `order + 1`, ...
    /// `preempted`: times this prompt's prefill was preempted before it completed.
    Group { prompt: std::sync::Arc<Vec<u32>>, samples: Vec<SampleSpec>, order: u64, preempted: u32 },
    /// A set-aside sequence being recomputed: prompt + generated[..n-1]; it then decodes on.
    Resume(Box<Seq>),
}

/// Runs every group to completion. `stop` is asked after each new token whether the
/// sample's text now ends with a stop string; `on_done` receives each finished sample
/// (in completion order); `on_step` sees the statistics of every step.
pub fn run(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    cfg: &SchedulerConfig,
    groups: Vec<PromptGroup>,
    stop: &mut dyn FnMut(usize, &[u32], &[TokenLogprob]) -> bool,
    on_done: &mut dyn FnMut(Finished) -> Result<()>,
    on_step: &mut dyn FnMut(StepStats),
) -> Result<()> {
    let mut groups = Some(groups);
    let mut feed = |_idle: bool| Ok(groups.take().map_or(Intake::Closed, Intake::Groups));
    run_fed(model, cache, cfg, &mut feed, stop, on_done, on_step)
}

/// What a work source hands the scheduler at the start of a step.
pub enum Intake {
    /// New prompts (possibly none) to queue behind the waiting ones.
    Groups(Vec<PromptGroup>),
    /// No more work will come: the loop ends once everything queued is finished.
    Closed,
}

/// The scheduler loop fed by a source that is asked for new work before every step, so
/// prompts arriving while others decode join the running batch (a server's requests).
/// `feed(idle)` is told whether nothing at all is queued or running; an idle source should
/// block until work arrives (or return empty groups now and then), not spin.
pub fn run_fed(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    cfg: &SchedulerConfig,
    feed: &mut dyn FnMut(bool) -> Result<Intake>,
    stop: &mut dyn FnMut(usize, &[u32], &[TokenLogprob]) -> bool,
    on_done: &mut dyn FnMut(Finished) -> Result<()>,
    on_step: &mut dyn FnMut(StepStats),
) -> Result<()> {
    if cfg.max_batch == 0 || cfg.prefill_chunk == 0 {
        bail!("the batch size and the prefill chunk must be at least 1");
    }
    let bs = cache.block_size();
    let capacity = cache.num_blocks() * bs;
    let max_len = match cfg.max_model_len {
        Some(n) if n > capacity => bail!(
            "a sequence of {n} tokens (the longest allowed) needs {} KV-cache blocks of {bs} tokens but the cache has {} ({capacity} tokens); give the cache more memory (--kv-cache-mb) or lower --max-model-len to at most {capacity}",
            n.div_ceil(bs),
            cache.num_blocks()
        ),
        Some(0) => bail!("the longest sequence (--max-model-len) must be at least 1 token"),
        Some(n) => n,
        None => capacity,
    };
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut resumes: VecDeque<Box<Seq>> = VecDeque::new();
    let mut prefilling: Vec<Prefill> = Vec::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut next_order: u64 = 0;
    let mut open = true;

    loop {
        let idle = waiting.is_empty() && resumes.is_empty() && prefilling.is_empty() && running.is_empty();
        if open {
            match feed(idle)? {
                Intake::Groups(groups) => enqueue(&mut waiting, groups, cfg, max_len, on_done)?,
                Intake::Closed => open = false,
            }
        }
        if waiting.is_empty() && resumes.is_empty() && prefilling.is_empty() && running.is_empty() {
            if open {
                continue;
            }
            break;
        }
        // Decode slots first (running sequences are older than anything admitted below):
        // every running sequence feeds its last sampled token. Reserve a slot for each,
        // oldest first; when the cache is full, preempt the youngest sequence (a running one,
        // or a prompt still prefilling) until the older ones fit.
        let mut preempted = 0;
        let mut i = 0;
        while i < running.len() {
            if running[i].table.reserve(cache, 1).is_ok() {
                i += 1;
                continue;
            }
            let youngest_prefill = (0..prefilling.len()).max_by_key(|&j| prefilling[j].order());
            let youngest_running = running.last().expect("running is not empty").order;
            preempted += 1;
            match youngest_prefill {
                Some(j) if prefilling[j].order() > youngest_running => {
                    let mut p = prefilling.remove(j);
                    p.table.release(cache);
                    match p.kind {
                        PrefillKind::Group { prompt, samples, order, preempted } => waiting.push_front(Waiting {
                            group: PromptGroup { prompt: std::sync::Arc::unwrap_or_clone(prompt), samples },
                            order: Some(order),
                            preempted: preempted + 1,
                        }),
                        PrefillKind::Resume(mut seq) => {
                            seq.preempted += 1;
                            queue_resume(&mut resumes, seq)
                        }
                    }
                }
                _ => {
                    let mut victim = running.pop().expect("running is not empty");
                    victim.table.release(cache);
                    victim.preempted += 1;
                    if running.is_empty() && prefilling.is_empty() {
                        bail!(
                            "the KV cache ({} blocks of {bs} tokens) cannot hold one sequence of {} tokens; give it more memory (--kv-cache-mb) or lower --max-model-len",
                            cache.num_blocks(),
                            victim.prompt.len() + victim.generated.len()
                        );
                    }
                    queue_resume(&mut resumes, Box::new(victim));
                }
            }
        }
        // Admit: preempted sequences first (they are older), then new prompts, while the
        // batch has room and the cache has blocks for the whole prompt plus its samples' first
        // tokens.
        let committed = |running: &Vec<Seq>, prefilling: &Vec<Prefill>| {
            running.len()
                + prefilling
                    .iter()
                    .map(|p| match &p.kind {
                        PrefillKind::Group { samples, .. } => samples.len(),
                        PrefillKind::Resume(_) => 1,
                    })
                    .sum::<usize>()
        };
        let pending_blocks = |prefilling: &Vec<Prefill>| -> usize {
            prefilling.iter().map(|p| (p.tokens.len() - p.done).div_ceil(bs) + 1).sum()
        };
        let mut cached_tokens = 0;
        loop {
            let free = cache.free_blocks().saturating_sub(pending_blocks(&prefilling));
            if let Some(seq) = resumes.pop_front() {
                if committed(&running, &prefilling) >= cfg.max_batch {
                    resumes.push_front(seq);
                    break;
                }
                let mut tokens = seq.prompt.as_ref().clone();
                tokens.extend_from_slice(&seq.generated[..seq.generated.len() - 1]);
                match Prefill::admit(cache, tokens, PrefillKind::Resume(seq), 1, free) {
                    Ok((p, taken)) => {
                        cached_tokens += taken;
                        prefilling.push(p);
                        continue;
                    }
                    Err(PrefillKind::Resume(seq)) => {
                        resumes.push_front(seq);
                        break;
                    }
                    Err(_) => unreachable!("admit hands back the kind it was given"),
                }
            }
            let Some(w) = waiting.pop_front() else { break };
            let n_samples = w.group.samples.len();
            if committed(&running, &prefilling) + n_samples > cfg.max_batch {
                waiting.push_front(w);
                break;
            }
            let order = w.order.unwrap_or(next_order);
            let prompt = std::sync::Arc::new(w.group.prompt);
            let kind = PrefillKind::Group { prompt: prompt.clone(), samples: w.group.samples, order, preempted: w.preempted };
            match Prefill::admit(cache, prompt.as_ref().clone(), kind, n_samples, free) {
                Ok((p, taken)) => {
                    next_order = next_order.max(order + n_samples as u64);
                    cached_tokens += taken;
                    prefilling.push(p);
                }
                Err(PrefillKind::Group { prompt, mut samples, order, preempted }) => {
                    let prompt = std::sync::Arc::unwrap_or_clone(prompt);
                    // Alone in the cache and still too many samples for it: admit them in
                    // parts (each sample keeps its stream, so its tokens do not change).
                    // One sample always fits: the prompt is shorter than the limit, which
                    // the cache holds.
                    if running.is_empty() && prefilling.is_empty() && samples.len() > 1 {
                        let fit = (1..samples.len()).rev().find(|&n| blocks_needed(prompt.len(), n, bs) <= cache.free_blocks()).unwrap_or(1);
                        let rest = samples.split_off(fit);
                        waiting.push_front(Waiting { group: PromptGroup { prompt: prompt.clone(), samples: rest }, order: None, preempted });
                        waiting.push_front(Waiting { group: PromptGroup { prompt, samples }, order: Some(order), preempted });
                        continue;
                    }
                    waiting.push_front(Waiting { group: PromptGroup { prompt, samples }, order: w.order, preempted });
                    break;
                }
                Err(_) => unreachable!("admit hands back the kind it was given"),
            }
        }

        let mut batch = BatchInput { tokens: Vec::new(), seqs: Vec::new() };
        for s in &running {
            batch.tokens.push(*s.generated.last().expect("a running sequence has sampled a token"));
            batch.seqs.push(SeqInput { start_pos: s.table.len(), len: 1, block_table: s.table.blocks().to_vec(), want_logits: true });
        }
        // Prefill chunks within the token budget.
        let mut budget = cfg.prefill_chunk;
        let mut chunks: Vec<(usize, usize, bool)> = Vec::new(); // (prefill index, len, completes)
        // Full blocks this step's chunks write: a prompt that shares them waits for the cache.
        let mut writing: HashSet<BlockHash> = HashSet::new();
        for (pi, p) in prefilling.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            cached_tokens += p.adopt_more(cache);
            let mut len = (p.tokens.len() - p.done).min(budget);
            // The full blocks this chunk would fill; one it began in an earlier step is its own.
            let first = p.done / bs;
            let mut filled = p.hashes.get(first..((p.done + len) / bs).min(p.hashes.len())).unwrap_or(&[]);
            let own = usize::from(p.done % bs != 0).min(filled.len());
            if let Some(j) = filled[own..].iter().position(|h| writing.contains(h)) {
                filled = &filled[..own + j];
                len = (first + own + j) * bs - p.done;
                if len == 0 {
                    continue;
                }
            }
            writing.extend(filled.iter().copied());
            if p.table.reserve(cache, len).is_err() {
                break;
            }
            budget -= len;
            let completes = p.done + len == p.tokens.len();
            let want = completes && matches!(p.kind, PrefillKind::Group { .. });
            batch.tokens.extend_from_slice(&p.tokens[p.done..p.done + len]);
            batch.seqs.push(SeqInput { start_pos: p.done, len, block_table: p.table.blocks().to_vec(), want_logits: want });
            chunks.push((pi, len, completes));
        }
        if batch.seqs.is_empty() {
            bail!("the scheduler could not make progress: the KV cache is too small for the next prompt; give it more memory (--kv-cache-mb)");
        }

        let logits = model.forward(&batch, cache)?;

        // Rows: one per running sequence, then one per completed new prompt.
        let n_running = running.len();
        let mut stats = StepStats { decode_tokens: n_running, cached_prefill_tokens: cached_tokens, preempted, ..Default::default() };
        for s in running.iter_mut() {
            s.table.advance(1);
            s.table.commit_full_blocks(cache, &s.prompt, &s.generated);
        }
        for &(pi, len, _) in &chunks {
            let p = &mut prefilling[pi];
            p.done += len;
            p.table.advance(len);
            p.table.commit_full_blocks(cache, &p.tokens, &[]);
            stats.prefill_tokens += len;
        }

        // Completed prefills become sequences: a prompt's samples share its table, the last
        // one taking it over. A completed prompt's logits row serves all its samples.
        let mut receivers: Vec<Seq> = std::mem::take(&mut running);
        let mut row_src: Vec<usize> = (0..n_running).collect();
        let mut resumed: Vec<Seq> = Vec::new();
        let mut done_prefills: Vec<Prefill> = Vec::new();
        for &(pi, _, completes) in chunks.iter().rev() {
            if completes {
                done_prefills.push(prefilling.remove(pi));
            }
        }
        done_prefills.reverse();
        let mut next_row = n_running;
        for p in done_prefills {
            match p.kind {
                PrefillKind::Group { prompt, samples, order, preempted } => {
                    let mut parent = Some(p.table);
                    let n = samples.len();
                    for (j, spec) in samples.into_iter().enumerate() {
                        let table = if j + 1 == n { parent.take().unwrap() } else { parent.as_ref().unwrap().fork(cache) };
                        let guide = spec.grammar.as_ref().map(|g| g.guide());
                        receivers.push(Seq { order: order + j as u64, spec, prompt: prompt.clone(), table, generated: Vec::new(), logprobs: Vec::new(), guide, preempted });
                        row_src.push(next_row);
                    }
                    next_row += 1;
                }
                PrefillKind::Resume(mut seq) => {
                    seq.table = p.table;
                    resumed.push(*seq);
                }
            }
        }
        let sampled = sample_rows(&logits, &row_src, &mut receivers)?;

        // Receivers are in the order the sampler's rows were assembled above.
        let mut new_running: Vec<Seq> = Vec::with_capacity(receivers.len() + resumed.len());
        for ((mut s, token), &row) in receivers.into_iter().zip(sampled).zip(&row_src) {
            let fault = match token {
                Ok(token) => {
                    if let Some(top) = s.spec.logprobs {
                        s.logprobs.push(token_logprob(&logits, row, token, top)?);
                    }
                    s.generated.push(token);
                    match s.guide.as_mut() {
                        Some(g) if !cfg.eos.contains(&token) => g.commit(token).err().map(|e| format!("{e:#}")),
                        _ => None,
                    }
                }
                Err(fault) => Some(fault),
            };
            let reason = match fault {
                Some(_) => Some(FinishReason::Error),
                None => finish_reason(&s, cfg, max_len, stop),
            };
            match reason {
                Some(reason) => {
                    s.table.release(cache);
                    stats.finished += 1;
                    on_done(finished(s, reason, fault))?;
                }
                None => new_running.push(s),
            }
        }
        new_running.extend(resumed);
        // Oldest first: the decode loop above preempts from the end.
        new_running.sort_by_key(|s| s.order);
        running = new_running;
        stats.running = running.len();
        stats.waiting = waiting.len() + resumes.len() + prefilling.len();
        on_step(stats);
    }
    Ok(())
}

/// A prompt group waiting to be admitted; a preempted one keeps the admission order of its
/// first sample.
struct Waiting {
    group: PromptGroup,
    order: Option<u64>,
    /// Times its prefill was preempted (counted for each of its samples).
    preempted: u32,
}

/// Queues a preempted sequence among the others by admission order (oldest first).
fn queue_resume(resumes: &mut VecDeque<Box<Seq>>, seq: Box<Seq>) {
    let at = resumes.partition_point(|s| s.order < seq.order);
    resumes.insert(at, seq);
}

/// Cache blocks a prompt of `len` tokens and its `samples` first decoded tokens take: the
/// prompt's blocks, then a block for each sample's first token. When the prompt ends inside
/// a block, the samples share it and all but one copy it on write.
fn blocks_needed(len: usize, samples: usize, block_size: usize) -> usize {
    len.div_ceil(block_size) + samples - usize::from(len % block_size != 0 && samples > 0)
}

/// Queues groups behind the waiting ones. A prompt with more samples than the batch holds
/// is split: each part has its own prefill (the samples' streams do not change, so neither
/// do their tokens). A prompt that leaves no room for a token under the length limit ends
/// its samples at once with [`FinishReason::Error`].
fn enqueue(waiting: &mut VecDeque<Waiting>, groups: Vec<PromptGroup>, cfg: &SchedulerConfig, max_len: usize, on_done: &mut dyn FnMut(Finished) -> Result<()>) -> Result<()> {
    for g in groups {
        if g.samples.is_empty() {
            continue;
        }
        if g.prompt.is_empty() {
            bail!("an empty prompt cannot be generated from (sample tag {})", g.samples[0].tag);
        }
        if g.prompt.len() >= max_len {
            let error = format!("the prompt has {} tokens, and a sequence may have at most {max_len} (--max-model-len), so no token could be generated", g.prompt.len());
            for s in g.samples {
                on_done(Finished { tag: s.tag, tokens: Vec::new(), finish: FinishReason::Error, prompt_len: g.prompt.len(), choice_probs: None, error: Some(error.clone()), preempted: 0, logprobs: s.logprobs.map(|_| Vec::new()) })?;
            }
            continue;
        }
        for part in g.samples.chunks(cfg.max_batch) {
            waiting.push_back(Waiting { group: PromptGroup { prompt: g.prompt.clone(), samples: part.to_vec() }, order: None, preempted: 0 });
        }
    }
    Ok(())
}

fn finish_reason(s: &Seq, cfg: &SchedulerConfig, max_len: usize, stop: &mut dyn FnMut(usize, &[u32], &[TokenLogprob]) -> bool) -> Option<FinishReason> {
    let last = *s.generated.last()?;
    if !s.spec.ignore_eos && cfg.eos.contains(&last) {
        Some(FinishReason::Stop)
    } else if s.guide.as_ref().is_some_and(Guide::is_complete) {
        Some(FinishReason::GrammarComplete)
    } else if stop(s.spec.tag, &s.generated, &s.logprobs) {
        Some(FinishReason::StopString)
    } else if s.generated.len() >= s.spec.max_new_tokens || s.prompt.len() + s.generated.len() >= max_len {
        Some(FinishReason::Length)
    } else {
        None
    }
}

fn finished(mut s: Seq, reason: FinishReason, error: Option<String>) -> Finished {
    if reason == FinishReason::Stop {
        s.generated.pop();
        s.logprobs.truncate(s.generated.len());
    }
    let choice_probs = s.guide.as_ref().and_then(|g| g.choice_probs()).map(<[f64]>::to_vec);
    let logprobs = s.spec.logprobs.map(|_| s.logprobs);
    Finished { tag: s.spec.tag, tokens: s.generated, finish: reason, prompt_len: s.prompt.len(), choice_probs, error, preempted: s.preempted, logprobs }
}

/// The log-probability of `token` in row `row` of `logits` ([rows, vocab]) and the `top`
/// most likely tokens: the row is copied to the host (only for samples that ask).
fn token_logprob(logits: &candle_core::Tensor, row: usize, token: u32, top: usize) -> Result<TokenLogprob> {
    let x: Vec<f32> = logits.get(row)?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let max = x.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    // log-sum-exp around the largest finite logit, in f64 for a 150k-token vocabulary.
    let lse = max as f64 + x.iter().filter(|v| v.is_finite()).map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln();
    let lp = |v: f32| (v as f64 - lse) as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..x.len() as u32).collect();
        let key = |&i: &u32| x[i as usize];
        let k = top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| key(b).total_cmp(&key(a)));
        idx.truncate(k);
        idx.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
        best = idx.into_iter().map(|i| (i, lp(x[i as usize]))).collect();
    }
    Ok(TokenLogprob { token, logprob: lp(x[token as usize]), top: best })
}

/// One token per receiver from its logits row `row_src[i]`: free samples by the sampler
/// where the logits are, structured ones on the host under their grammar's mask. A row with
/// no finite logit (no token can be drawn) is that receiver's fault, not the batch's.
fn sample_rows(logits: &candle_core::Tensor, row_src: &[usize], seqs: &mut [Seq]) -> Result<Vec<std::result::Result<u32, String>>> {
    let free: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].guide.is_none()).collect();
    let mut out = vec![NO_TOKEN; seqs.len()];
    if !free.is_empty() {
        let rows: Vec<usize> = free.iter().map(|&i| row_src[i]).collect();
        let params: Vec<SamplingParams> = free.iter().map(|&i| seqs[i].spec.params).collect();
        let keys: Vec<StreamKey> = free.iter().map(|&i| seqs[i].spec.stream).collect();
        let steps: Vec<u64> = free.iter().map(|&i| seqs[i].generated.len() as u64).collect();
        for (&i, t) in free.iter().zip(sample_logits(logits, &rows, &params, &keys, &steps)?) {
            out[i] = t;
        }
    }
    let mut faults: Vec<Option<String>> = vec![None; seqs.len()];
    for (i, s) in seqs.iter_mut().enumerate() {
        match s.guide.as_mut() {
            None => {
                if out[i] == NO_TOKEN {
                    faults[i] = Some(format!("the model's logits for token {} of this sample have no finite value (NaN or infinite); the sample ends here", s.generated.len() + 1));
                }
            }
            Some(guide) => {
                let mut row: Vec<f32> = logits.get(row_src[i])?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                guide.mask(&mut row)?;
                out[i] = sample_row(&row, &s.spec.params, s.spec.stream.uniform(s.generated.len() as u64));
                if out[i] == NO_TOKEN {
                    faults[i] = Some(format!("structured output: no token the grammar allows has a finite logit at token {} of this sample; the sample ends here", s.generated.len() + 1));
                }
            }
        }
    }
    Ok(out.into_iter().zip(faults).map(|(t, f)| f.map_or(Ok(t), Err)).collect())
}

#[cfg(test)]
mod tests {
    //! The scheduler's policies on a stand-in model whose next token is a function of the
    //! last one (it reads no KV, so these tests are about who runs, not about attention;
    //! tests/engine.rs checks the tokens of the real model under the same pressure).
    use super::*;
    use crate::engine::config::ModelConfig;
    use candle_core::{DType, Device, Tensor};

    const VOCAB: usize = 64;
    /// Fed this token, the stand-in model's logits are NaN.
    const POISON: u32 = 63;

    struct Successor {
        config: ModelConfig,
        device: Device,
    }

    impl Successor {
        fn new() -> Successor {
            let json = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096}"#;
            Successor { config: ModelConfig::from_hf_config(json).unwrap(), device: Device::Cpu }
        }
    }

    impl CausalLM for Successor {
        fn config(&self) -> &ModelConfig {
            &self.config
        }
        fn device(&self) -> &Device {
            &self.device
        }
        /// Next token = last token + 1; NaN after POISON.
        fn forward(&self, batch: &BatchInput, cache: &mut KvCache) -> anyhow::Result<Tensor> {
            cache.apply_pending_copies()?;
            let mut rows = Vec::new();
            let mut at = 0;
            for s in &batch.seqs {
                at += s.len;
                if !s.want_logits {
                    continue;
                }
                let last = batch.tokens[at - 1];
                let mut row = vec![0f32; VOCAB];
                if last == POISON {
                    row.fill(f32::NAN);
                } else {
                    row[(last as usize + 1) % VOCAB] = 10.0;
                }
                rows.extend(row);
            }
            let n = rows.len() / VOCAB;
            Ok(Tensor::from_vec(rows, (n, VOCAB), &Device::Cpu)?)
        }
    }

    fn spec(tag: usize, max_new_tokens: usize) -> SampleSpec {
        SampleSpec { tag, params: SamplingParams::greedy(), stream: StreamKey::new(0, "t", tag as u32), max_new_tokens, ignore_eos: false, grammar: None, logprobs: None }
    }

    /// Runs `groups`; returns the finished samples by tag and the preemptions counted.
    fn run_all(groups: Vec<PromptGroup>, blocks: usize, block_size: usize, cfg: SchedulerConfig) -> (Vec<Finished>, usize) {
        let model = Successor::new();
        let mut cache = KvCache::new(&model.config, block_size, blocks, DType::F32, &Device::Cpu).unwrap();
        let mut done: Vec<Finished> = Vec::new();
        let mut preempted = 0;
        run(&model, &mut cache, &cfg, groups, &mut |_, _, _| false, &mut |f| Ok(done.push(f)), &mut |s| preempted += s.preempted).unwrap();
        assert_eq!(cache.free_blocks(), blocks, "every block comes back");
        done.sort_by_key(|f| f.tag);
        (done, preempted)
    }

    fn cfg(max_batch: usize, max_model_len: Option<usize>) -> SchedulerConfig {
        SchedulerConfig { max_batch, prefill_chunk: 64, eos: vec![], max_model_len }
    }

    #[test]
    fn a_sequence_ends_at_the_length_limit() {
        let prompt: Vec<u32> = (1..=10).collect();
        let groups = vec![PromptGroup { prompt: prompt.clone(), samples: vec![spec(0, 1000), spec(1, 3)] }];
        // 4 blocks of 4 tokens: one sequence may have 16 tokens, 6 of them new.
        let (done, _) = run_all(groups.clone(), 4, 4, cfg(4, None));
        assert_eq!((done[0].finish, done[0].tokens.len()), (FinishReason::Length, 6));
        assert_eq!(done[0].tokens, (11..=16).collect::<Vec<u32>>());
        assert_eq!((done[1].finish, done[1].tokens.len()), (FinishReason::Length, 3), "its own max_new_tokens comes first");
        // An explicit limit below the cache's.
        let (done, _) = run_all(groups.clone(), 4, 4, cfg(4, Some(12)));
        assert_eq!(done[0].tokens.len(), 2);
        // One the cache cannot hold is refused at the start, with the numbers and the fix.
        let model = Successor::new();
        let mut cache = KvCache::new(&model.config, 4, 4, DType::F32, &Device::Cpu).unwrap();
        let e = run(&model, &mut cache, &cfg(4, Some(17)), groups, &mut |_, _, _| false, &mut |_| Ok(()), &mut |_| {}).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("17 tokens") && e.contains("16 tokens") && e.contains("--max-model-len"), "{e}");
    }

    #[test]
    fn a_prompt_over_the_limit_fails_alone() {
        let long: Vec<u32> = (1..=16).collect();
        let groups = vec![
            PromptGroup { prompt: vec![1, 2, 3], samples: vec![spec(0, 4)] },
            PromptGroup { prompt: long, samples: vec![spec(1, 4), spec(2, 4)] },
            PromptGroup { prompt: vec![5, 6], samples: vec![spec(3, 4)] },
        ];
        let (done, _) = run_all(groups, 4, 4, cfg(4, None));
        for tag in [1, 2] {
            assert_eq!(done[tag].finish, FinishReason::Error);
            let e = done[tag].error.as_deref().unwrap();
            assert!(e.contains("16 tokens") && e.contains("at most 16"), "{e}");
        }
        assert_eq!((done[0].tokens.clone(), done[0].finish), (vec![4, 5, 6, 7], FinishReason::Length));
        assert_eq!(done[3].tokens, vec![7, 8, 9, 10]);
    }

    #[test]
    fn a_row_without_finite_logits_ends_its_sample_only() {
        // The poisoned prompt's samples get NaN logits at their first token; a sample that
        // walks into the poison later ends there, after the tokens it had.
        let groups = vec![
            PromptGroup { prompt: vec![1, 2], samples: vec![spec(0, 5), spec(1, 5)] },
            PromptGroup { prompt: vec![7, POISON], samples: vec![spec(2, 5)] },
            PromptGroup { prompt: vec![60], samples: vec![spec(3, 5)] },
        ];
        let (done, _) = run_all(groups, 64, 4, cfg(8, None));
        assert_eq!(done[0].tokens, vec![3, 4, 5, 6, 7]);
        assert_eq!(done[1].tokens, vec![3, 4, 5, 6, 7]);
        assert_eq!((done[2].finish, done[2].tokens.len()), (FinishReason::Error, 0));
        assert!(done[2].error.as_deref().unwrap().contains("no finite value"), "{:?}", done[2].error);
        assert_eq!((done[3].finish, done[3].tokens.clone()), (FinishReason::Error, vec![61, 62, 63]));
    }

    #[test]
    fn more_samples_than_the_cache_holds_at_once_are_admitted_in_parts() {
        // A 14-token prompt and 4 samples of 2 new tokens: 4 + 3 blocks together, in a cache
        // of 5. Each sample draws from its own stream, so the parts decode the same.
        let prompt: Vec<u32> = (1..=14).collect();
        let groups = vec![PromptGroup { prompt, samples: (0..4).map(|t| spec(t, 2)).collect() }];
        let (done, _) = run_all(groups, 5, 4, cfg(8, None));
        assert!(done.iter().all(|f| f.tokens == vec![15, 16] && f.finish == FinishReason::Length), "{done:?}");
    }

    #[test]
    fn preemption_is_first_come_first_served() {
        // Twelve samples of the same length in a cache that holds about two of them: the
        // youngest is always the one preempted, and a preempted one resumes ahead of every
        // sample admitted after it, so they finish in the order they came, however often
        // they were set aside. (When a resumed sequence went behind younger ones, as it did,
        // it was preempted again first and finished after them.)
        let groups: Vec<PromptGroup> = (0..12).map(|t| PromptGroup { prompt: vec![1, 2, 3, 4], samples: vec![spec(t, 24)] }).collect();
        for blocks in [12, 14, 16] {
            let model = Successor::new();
            let mut cache = KvCache::new(&model.config, 4, blocks, DType::F32, &Device::Cpu).unwrap();
            let (mut order, mut done, mut preempted) = (Vec::new(), Vec::new(), 0);
            let mut on_done = |f: Finished| {
                order.push(f.tag);
                done.push(f);
                Ok(())
            };
            run(&model, &mut cache, &cfg(6, None), groups.clone(), &mut |_, _, _| false, &mut on_done, &mut |s| preempted += s.preempted).unwrap();
            assert!(preempted > 0, "{blocks} blocks: the cache is too small for all at once");
            assert_eq!(done.iter().map(|f| f.preempted as usize).sum::<usize>(), preempted, "each preemption is counted once");
            assert_eq!(order, (0..12).collect::<Vec<_>>(), "{blocks} blocks: preempted {:?}", done.iter().map(|f| (f.tag, f.preempted)).collect::<Vec<_>>());
            assert!(done.iter().all(|f| f.tokens == (5..29).collect::<Vec<u32>>()), "every sample's tokens, however often it was set aside");
        }
    }
}
