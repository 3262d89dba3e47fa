//! The engine thread: it owns the model and the KV cache, takes requests in before every
//! scheduler step (so concurrent requests decode in one continuous batch), and sends each
//! request's tokens back as they are decoded (streamed requests) and its samples when they
//! finish. A request whose client went away is cancelled: its sequences end at the next
//! step and free their blocks.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use anyhow::Result;
use tokio::sync::mpsc::UnboundedSender;

use super::ServeStats;
use crate::backends::local::StopMatcher;
use crate::engine::constraint::Grammar;
use crate::engine::kv_cache::KvCache;
use crate::engine::load::LoadedModel;
use crate::engine::sampler::{SamplingParams, StreamKey};
use crate::engine::scheduler::{self, Finished, Intake, PromptGroup, SampleSpec, SchedulerConfig, TokenLogprob};

/// What the engine tells a request.
#[derive(Debug)]
pub(super) enum Event {
    /// New tokens of choice `choice` (streamed requests only), with their log-probabilities
    /// when the request asked for them.
    Tokens { choice: usize, tokens: Vec<u32>, logprobs: Vec<TokenLogprob> },
    /// Choice `choice` finished.
    Done { choice: usize, finished: Finished },
}

/// A request handed to the engine: one prompt, its samples, their stop strings.
pub(super) struct Job {
    pub prompt: Vec<u32>,
    /// Each sample's sampling, stream and most new tokens.
    pub samples: Vec<(SamplingParams, StreamKey, usize)>,
    /// `response_format`'s grammar, for every sample.
    pub grammar: Option<Arc<Grammar>>,
    pub stop: Vec<String>,
    /// vLLM's `ignore_eos`: every sample runs to its max_tokens.
    pub ignore_eos: bool,
    /// Send [`Event::Tokens`] as the samples decode.
    pub stream: bool,
    /// Record log-probabilities, with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Set when the client is gone: the samples end at the next step.
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<Event>,
}

/// Per-request bookkeeping inside the engine thread.
struct Pending {
    stream: bool,
    cancel: Arc<AtomicBool>,
    events: UnboundedSender<Event>,
}

/// Per-sample bookkeeping: its request, its choice index, tokens already streamed.
struct Sample {
    job: usize,
    choice: usize,
    sent: usize,
    max_tokens: usize,
}

/// Runs the scheduler on the jobs from `rx` until the channel closes and the last job is done.
pub(super) fn run(m: LoadedModel, mut cache: KvCache, sched: SchedulerConfig, rx: mpsc::Receiver<Job>, stats: &ServeStats) -> Result<()> {
    let jobs: RefCell<HashMap<usize, Pending>> = RefCell::new(HashMap::new());
    let samples: RefCell<HashMap<usize, Sample>> = RefCell::new(HashMap::new());
    let tokenizer = &m.tokenizer;
    // Each sample's stop strings, matched as it decodes.
    let matchers: RefCell<HashMap<usize, StopMatcher>> = RefCell::new(HashMap::new());
    // When the step being run began (for the drain-time estimate behind Retry-After).
    let step_began: Cell<Option<Instant>> = Cell::new(None);
    let mut next_job = 0usize;
    let mut next_tag = 0usize;
    let mut feed = |idle: bool| -> Result<Intake> {
        let first = if idle {
            match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => return Ok(Intake::Closed),
            }
        } else {
            None
        };
        let mut groups = Vec::new();
        for job in first.into_iter().chain(rx.try_iter()) {
            let id = next_job;
            next_job += 1;
            let mut specs = Vec::with_capacity(job.samples.len());
            for (choice, (params, stream, max_new_tokens)) in job.samples.iter().enumerate() {
                samples.borrow_mut().insert(next_tag, Sample { job: id, choice, sent: 0, max_tokens: *max_new_tokens });
                if !job.stop.is_empty() {
                    matchers.borrow_mut().insert(next_tag, StopMatcher::new(tokenizer, &job.stop));
                }
                specs.push(SampleSpec { tag: next_tag, params: *params, stream: *stream, max_new_tokens: *max_new_tokens, ignore_eos: job.ignore_eos, grammar: job.grammar.clone(), logprobs: job.logprobs });
                next_tag += 1;
            }
            jobs.borrow_mut().insert(id, Pending { stream: job.stream, cancel: job.cancel, events: job.events });
            groups.push(PromptGroup { prompt: job.prompt, samples: specs });
        }
        step_began.set(Some(Instant::now()));
        Ok(Intake::Groups(groups))
    };
    // Asked after every decoded token: streams the new tokens, ends a cancelled sample, and
    // matches the stop strings.
    let mut stop = |tag: usize, toks: &[u32], logprobs: &[TokenLogprob]| -> bool {
        let mut samples = samples.borrow_mut();
        let s = samples.get_mut(&tag).expect("every tag was registered");
        let jobs = jobs.borrow();
        let job = &jobs[&s.job];
        if job.cancel.load(Ordering::Relaxed) {
            return true;
        }
        if job.stream && toks.len() > s.sent {
            let logprobs = logprobs.get(s.sent..).map(<[TokenLogprob]>::to_vec).unwrap_or_default();
            let _ = job.events.send(Event::Tokens { choice: s.choice, tokens: toks[s.sent..].to_vec(), logprobs });
            s.sent = toks.len();
        }
        matchers.borrow_mut().get_mut(&tag).is_some_and(|m| m.hit(toks))
    };
    let mut on_done = |f: Finished| -> Result<()> {
        matchers.borrow_mut().remove(&f.tag);
        let s = samples.borrow_mut().remove(&f.tag).expect("every tag was registered");
        stats.queued_samples.fetch_sub(1, Ordering::SeqCst);
        stats.queued_max_tokens.fetch_sub(s.max_tokens, Ordering::SeqCst);
        let mut jobs = jobs.borrow_mut();
        let job = jobs.get(&s.job).expect("a request outlives its samples");
        if job.cancel.load(Ordering::Relaxed) {
            stats.cancelled_samples.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.drain.lock().unwrap().sample_done(f.tokens.len());
        }
        // A client that went away no longer listens; that is not the engine's problem.
        let _ = job.events.send(Event::Done { choice: s.choice, finished: f });
        if !samples.borrow().values().any(|o| o.job == s.job) {
            jobs.remove(&s.job);
        }
        Ok(())
    };
    let mut on_step = |s: scheduler::StepStats| {
        if s.decode_tokens > 0 {
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats.decode_tokens.fetch_add(s.decode_tokens, Ordering::Relaxed);
            if let Some(t) = step_began.get() {
                stats.drain.lock().unwrap().step_done(t.elapsed().as_secs_f64());
            }
        }
        stats.prefill_tokens.fetch_add(s.prefill_tokens, Ordering::Relaxed);
        stats.cached_prefill_tokens.fetch_add(s.cached_prefill_tokens, Ordering::Relaxed);
        stats.running_samples.store(s.running, Ordering::Relaxed);
    };
    scheduler::run_fed(m.model.as_ref(), &mut cache, &sched, &mut feed, &mut stop, &mut on_done, &mut on_step)
}

/// What the engine has measured of its own pace, for Retry-After: how long a step takes and
/// how many tokens a finished sample had, as exponential moving averages.
#[derive(Debug, Default)]
pub struct DrainEstimate {
    step_seconds: Option<f64>,
    sample_tokens: Option<f64>,
}

impl DrainEstimate {
    const WEIGHT: f64 = 0.1;

    fn step_done(&mut self, seconds: f64) {
        self.step_seconds = Some(self.step_seconds.map_or(seconds, |s| s + Self::WEIGHT * (seconds - s)));
    }

    fn sample_done(&mut self, tokens: usize) {
        let t = tokens as f64;
        self.sample_tokens = Some(self.sample_tokens.map_or(t, |s| s + Self::WEIGHT * (t - s)));
    }

    /// Seconds until `samples` more samples have finished, with `batch` decoding at once and
    /// `max_tokens` the mean limit of the samples queued: each sample takes its expected
    /// length in steps (the mean length of finished samples, at most `max_tokens`; the limit
    /// itself before any has finished), and `batch` of them finish per that many steps. An
    /// upper bound, as the samples running are part done. `None` before the first step has
    /// been timed.
    pub fn seconds_for(&self, samples: usize, batch: usize, max_tokens: usize) -> Option<f64> {
        let step = self.step_seconds?;
        let len = self.sample_tokens.map_or(max_tokens as f64, |t| t.min(max_tokens as f64)).max(1.0);
        let rounds = (samples as f64 / batch.max(1) as f64).ceil();
        Some(rounds * len * step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_time_counts_rounds_of_a_full_batch() {
        let mut d = DrainEstimate::default();
        assert_eq!(d.seconds_for(10, 4, 100), None);
        d.step_done(0.05);
        // 10 samples at 4 per round: 3 rounds of 100 steps of 0.05 s.
        assert!((d.seconds_for(10, 4, 100).unwrap() - 15.0).abs() < 1e-9);
        d.sample_done(20);
        assert!((d.seconds_for(4, 4, 100).unwrap() - 1.0).abs() < 1e-9);
        // Never longer than the queued samples' limit.
        assert!((d.seconds_for(4, 4, 10).unwrap() - 0.5).abs() < 1e-9);
        // Moving averages move a tenth of the way.
        d.sample_done(120);
        assert!((d.sample_tokens.unwrap() - 30.0).abs() < 1e-9);
    }
}
