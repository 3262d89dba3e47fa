//! Continuous batching over the paged KV cache.
//!
//! One loop, one forward per step: every running sequence contributes its next token,
//! waiting prompts contribute prefill chunks (up to a token budget), finished sequences
//! give their blocks back at once so the next prompt enters on the following step. The k
//! samples of one query share one prefill: the prompt is written once, then the block table
//! is forked k times. When the cache runs out, the youngest sequence is set aside and later
//! recomputed, so memory pressure admits fewer, never crashes.
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
    /// Structured output: the grammar every token must follow (None: free text).
    pub grammar: Option<std::sync::Arc<Grammar>>,
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
                        SampleSpec { tag: tag - 1, params, stream: StreamKey::new(seed, &format!("{item_prefix}{i}"), s), max_new_tokens, grammar: None }
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
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one step (long prompts are chunked).
    pub prefill_chunk: usize,
    /// End-of-sequence token ids.
    pub eos: Vec<u32>,
}

/// What one step did, for progress bars and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Prompt tokens computed (prefilled) in this step.
    pub prefill_tokens: usize,
    /// Prompt tokens taken from the prefix cache instead of being computed, in this step.
    pub cached_prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Sequences set aside in this step for lack of cache blocks (recomputed later).
    pub set_aside: usize,
    pub running: usize,
    pub waiting: usize,
    pub finished: usize,
}

/// A sequence that is decoding.
struct Seq {
    spec: SampleSpec,
    prompt: std::sync::Arc<Vec<u32>>,
    table: BlockTable,
    generated: Vec<u32>,
    /// The grammar state of a structured sample.
    guide: Option<Guide>,
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
    /// takes. Otherwise `kind` comes back with the number of blocks it needs.
    fn admit(cache: &mut KvCache, tokens: Vec<u32>, kind: PrefillKind, samples: usize, free: usize) -> std::result::Result<(Prefill, usize), (PrefillKind, usize)> {
        let bs = cache.block_size();
        let hashes = if cache.prefix_caching() { block_hashes(&tokens, bs) } else { Vec::new() };
        let cap = reusable_blocks(tokens.len(), bs);
        let hit = cache.cached_prefix(&hashes, &tokens, cap);
        let need = (tokens.len() - hit.blocks * bs).div_ceil(bs) + samples + hit.idle;
        if need > free {
            return Err((kind, need));
        }
        let mut table = BlockTable::new();
        let done = table.adopt_cached_prefix(cache, &hashes, &tokens, cap);
        Ok((Prefill { tokens, done, table, kind, hashes }, done))
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
    Group { prompt: std::sync::Arc<Vec<u32>>, samples: Vec<SampleSpec> },
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
    stop: &mut dyn FnMut(usize, &[u32]) -> bool,
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
    stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    on_done: &mut dyn FnMut(Finished) -> Result<()>,
    on_step: &mut dyn FnMut(StepStats),
) -> Result<()> {
    if cfg.max_batch == 0 || cfg.prefill_chunk == 0 {
        bail!("the batch size and the prefill chunk must be at least 1");
    }
    let bs = cache.block_size();
    let mut waiting: VecDeque<PromptGroup> = VecDeque::new();
    let mut resumes: VecDeque<Box<Seq>> = VecDeque::new();
    let mut prefilling: Vec<Prefill> = Vec::new();
    let mut running: Vec<Seq> = Vec::new();
    let mut open = true;

    loop {
        let idle = waiting.is_empty() && resumes.is_empty() && prefilling.is_empty() && running.is_empty();
        if open {
            match feed(idle)? {
                Intake::Groups(groups) => enqueue(&mut waiting, groups, cfg)?,
                Intake::Closed => open = false,
            }
        }
        if waiting.is_empty() && resumes.is_empty() && prefilling.is_empty() && running.is_empty() {
            if open {
                continue;
            }
            break;
        }
        // Admit: set-aside sequences first (they are older), then new prompts, while the
        // batch has room and the cache has blocks for the whole prompt plus one per sample.
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
                    Err((PrefillKind::Resume(seq), _)) => {
                        resumes.push_front(seq);
                        break;
                    }
                    Err(_) => unreachable!("admit hands back the kind it was given"),
                }
            }
            let Some(g) = waiting.pop_front() else { break };
            let n_samples = g.samples.len();
            if committed(&running, &prefilling) + n_samples > cfg.max_batch {
                waiting.push_front(g);
                break;
            }
            let prompt = std::sync::Arc::new(g.prompt);
            let kind = PrefillKind::Group { prompt: prompt.clone(), samples: g.samples };
            match Prefill::admit(cache, prompt.as_ref().clone(), kind, n_samples, free) {
                Ok((p, taken)) => {
                    cached_tokens += taken;
                    prefilling.push(p);
                }
                Err((PrefillKind::Group { prompt, samples }, need)) => {
                    if running.is_empty() && prefilling.is_empty() && need > cache.free_blocks() {
                        bail!(
                            "a prompt of {} tokens with {} samples needs {need} KV-cache blocks of {bs} tokens but the cache has {} in all; give the cache more memory (--kv-cache-mb) or use fewer samples",
                            prompt.len(),
                            samples.len(),
                            cache.num_blocks()
                        );
                    }
                    waiting.push_front(PromptGroup { prompt: std::sync::Arc::unwrap_or_clone(prompt), samples });
                    break;
                }
                Err(_) => unreachable!("admit hands back the kind it was given"),
            }
        }

        // Decode inputs: every running sequence feeds its last sampled token. Reserve a
        // slot for each; when the cache is full, set the youngest aside for recompute.
        let mut set_aside = 0;
        let mut i = 0;
        while i < running.len() {
            if running[i].table.reserve(cache, 1).is_ok() {
                i += 1;
                continue;
            }
            let mut victim = running.pop().expect("running is not empty");
            victim.table.release(cache);
            if running.is_empty() && prefilling.is_empty() {
                bail!("the KV cache cannot hold even one sequence of {} tokens; give it more memory (--kv-cache-mb)", victim.prompt.len() + victim.generated.len());
            }
            resumes.push_front(Box::new(victim));
            set_aside += 1;
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
        let mut stats = StepStats { decode_tokens: n_running, cached_prefill_tokens: cached_tokens, set_aside, ..Default::default() };
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

        // Completed prefills become sequences (youngest last, so they are set aside first):
        // a prompt's samples share its table, the last one taking it over. A completed
        // prompt's logits row serves all its samples.
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
                PrefillKind::Group { prompt, samples } => {
                    let mut parent = Some(p.table);
                    let n = samples.len();
                    for (j, spec) in samples.into_iter().enumerate() {
                        let table = if j + 1 == n { parent.take().unwrap() } else { parent.as_ref().unwrap().fork(cache) };
                        let guide = spec.grammar.as_ref().map(|g| g.guide());
                        receivers.push(Seq { spec, prompt: prompt.clone(), table, generated: Vec::new(), guide });
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
        for (mut s, &token) in receivers.into_iter().zip(&sampled) {
            s.generated.push(token);
            if let Some(g) = s.guide.as_mut() {
                if !cfg.eos.contains(&token) {
                    g.commit(token)?;
                }
            }
            match finish_reason(&s, cfg, stop) {
                Some(reason) => {
                    s.table.release(cache);
                    stats.finished += 1;
                    on_done(finished(s, reason))?;
                }
                None => new_running.push(s),
            }
        }
        new_running.extend(resumed);
        running = new_running;
        stats.running = running.len();
        stats.waiting = waiting.len() + resumes.len() + prefilling.len();
        on_step(stats);
    }
    Ok(())
}

/// Queues groups behind the waiting ones. A prompt with more samples than the batch holds
/// is split: each part has its own prefill (the samples' streams do not change, so neither
/// do their tokens).
fn enqueue(waiting: &mut VecDeque<PromptGroup>, groups: Vec<PromptGroup>, cfg: &SchedulerConfig) -> Result<()> {
    for g in groups {
        if g.samples.is_empty() {
            continue;
        }
        if g.prompt.is_empty() {
            bail!("an empty prompt cannot be generated from (sample tag {})", g.samples[0].tag);
        }
        for part in g.samples.chunks(cfg.max_batch) {
            waiting.push_back(PromptGroup { prompt: g.prompt.clone(), samples: part.to_vec() });
        }
    }
    Ok(())
}

fn finish_reason(s: &Seq, cfg: &SchedulerConfig, stop: &mut dyn FnMut(usize, &[u32]) -> bool) -> Option<FinishReason> {
    let last = *s.generated.last()?;
    if cfg.eos.contains(&last) {
        Some(FinishReason::Stop)
    } else if s.guide.as_ref().is_some_and(Guide::is_complete) {
        Some(FinishReason::GrammarComplete)
    } else if stop(s.spec.tag, &s.generated) {
        Some(FinishReason::StopString)
    } else if s.generated.len() >= s.spec.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    }
}

fn finished(mut s: Seq, reason: FinishReason) -> Finished {
    if reason == FinishReason::Stop {
        s.generated.pop();
    }
    let choice_probs = s.guide.as_ref().and_then(|g| g.choice_probs()).map(<[f64]>::to_vec);
    Finished { tag: s.spec.tag, tokens: s.generated, finish: reason, prompt_len: s.prompt.len(), choice_probs }
}

/// One token per receiver from its logits row `row_src[i]`: free samples by the sampler
/// where the logits are, structured ones on the host under their grammar's mask.
fn sample_rows(logits: &candle_core::Tensor, row_src: &[usize], seqs: &mut [Seq]) -> Result<Vec<u32>> {
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
    for (i, s) in seqs.iter_mut().enumerate() {
        let Some(guide) = s.guide.as_mut() else { continue };
        let mut row: Vec<f32> = logits.get(row_src[i])?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        guide.mask(&mut row)?;
        out[i] = sample_row(&row, &s.spec.params, s.spec.stream.uniform(s.generated.len() as u64));
        if out[i] == NO_TOKEN {
            bail!("structured output: no allowed token has a finite logit (sample tag {})", s.spec.tag);
        }
    }
    Ok(out)
}
