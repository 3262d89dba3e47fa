//! The engine thread: it owns the model and the KV cache, takes requests in before every
//! scheduler step (so concurrent requests decode in one continuous batch), and sends each
//! request's tokens back as they are decoded (streamed requests) and its samples when they
//! finish. A request whose client went away is cancelled: its sequences end at the next
//! step and free their blocks.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

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
    /// Samples not finished yet.
    left: usize,
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
            jobs.borrow_mut().insert(id, Pending { left: job.samples.len(), stream: job.stream, cancel: job.cancel, events: job.events });
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
        let job = jobs.get_mut(&s.job).expect("a request outlives its samples");
        job.left -= 1;
        if job.cancel.load(Ordering::Relaxed) {
            stats.cancelled_samples.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.drain.lock().unwrap().sample_done(f.tokens.len(), s.max_tokens);
        }
        // A client that went away no longer listens; that is not the engine's problem.
        let _ = job.events.send(Event::Done { choice: s.choice, finished: f });
        if job.left == 0 {
            jobs.remove(&s.job);
        }
        Ok(())
    };
    let mut on_step = |s: scheduler::StepStats| {
        if s.decode_tokens > 0 {
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats.decode_tokens.fetch_add(s.decode_tokens, Ordering::Relaxed);
            if let Some(t) = step_began.get() {
                // The drain pace is that of decode steps: steps that also prefill (a flood's
                // prompts) only seed the estimate.
                let mut drain = stats.drain.lock().unwrap();
                if s.prefill_tokens == 0 || !drain.has_pace() {
                    drain.step_done(t.elapsed().as_secs_f64());
                }
            }
        }
        stats.prefill_tokens.fetch_add(s.prefill_tokens, Ordering::Relaxed);
        stats.cached_prefill_tokens.fetch_add(s.cached_prefill_tokens, Ordering::Relaxed);
        stats.running_samples.store(s.running, Ordering::Relaxed);
    };
    scheduler::run_fed(m.model.as_ref(), &mut cache, &sched, &mut feed, &mut stop, &mut on_done, &mut on_step)
}

/// What the engine has measured of its own pace, for Retry-After: how long a step takes and
/// how many tokens a finished sample had, as exponential moving averages; and the samples
/// already told to come back, which are ahead of a request refused now.
#[derive(Debug, Default)]
pub struct DrainEstimate {
    step_seconds: Option<f64>,
    /// The share of its max_tokens a finished sample used (lengths follow the limits asked
    /// for, which change from one load to the next; the share carries over better).
    used_share: Option<f64>,
    /// Refused requests' samples and when they were told to come back.
    promised: std::collections::VecDeque<(Instant, usize)>,
}

impl DrainEstimate {
    const WEIGHT: f64 = 0.2;
    /// A step's time before one has been measured (a flood at start is refused before the
    /// first step ends): a CPU's or a large model's step, so early clients wait long enough.
    const PRIOR_STEP_SECONDS: f64 = 0.1;
    /// Room for prefill steps and a pace that varies.
    const MARGIN: f64 = 1.5;
    /// Longest Retry-After: the `openai` SDK gives up on longer ones.
    pub const MAX_SECONDS: u64 = 60;

    fn has_pace(&self) -> bool {
        self.step_seconds.is_some()
    }

    fn step_done(&mut self, seconds: f64) {
        self.step_seconds = Some(self.step_seconds.map_or(seconds, |s| s + Self::WEIGHT * (seconds - s)));
    }

    fn sample_done(&mut self, tokens: usize, max_tokens: usize) {
        let u = (tokens as f64 / max_tokens.max(1) as f64).min(1.0);
        self.used_share = Some(self.used_share.map_or(u, |s| s + Self::WEIGHT * (u - s)));
    }

    /// Seconds until `samples` more samples have finished, with `batch` decoding at once and
    /// `max_tokens` the mean limit of the samples queued: each sample takes its expected
    /// length in steps (`max_tokens` times the share of their limit finished samples used;
    /// all of it before any has finished), and `batch` of them finish per that many steps.
    /// An upper bound, as the samples running are part done.
    pub fn seconds_for(&self, samples: usize, batch: usize, max_tokens: usize) -> f64 {
        let step = self.step_seconds.unwrap_or(Self::PRIOR_STEP_SECONDS);
        let len = (self.used_share.unwrap_or(1.0) * max_tokens as f64).max(1.0);
        let rounds = (samples as f64 / batch.max(1) as f64).ceil();
        rounds * len * step
    }

    /// Retry-After, in whole seconds (1 to [`Self::MAX_SECONDS`]), for a request of `n`
    /// samples refused at `now` with `queued` samples queued or decoding under a bound of
    /// `max_queue`: the time for enough samples to finish that it fits behind the samples
    /// already told to come back (so clients refused together come back in turn, not all at
    /// once into room for a few). The request is then counted among those.
    pub fn retry_after(&mut self, now: Instant, queued: usize, n: usize, max_queue: usize, batch: usize, max_tokens: usize) -> u64 {
        let ahead: usize = self.promised.iter().map(|&(_, k)| k).sum();
        let excess = (queued + ahead + n).saturating_sub(max_queue).max(1);
        let secs = (Self::MARGIN * self.seconds_for(excess, batch, max_tokens)).ceil() as u64;
        let secs = secs.clamp(1, Self::MAX_SECONDS);
        let at = now + Duration::from_secs(secs);
        // Kept in order of their time.
        let i = self.promised.partition_point(|&(t, _)| t <= at);
        self.promised.insert(i, (at, n));
        secs
    }

    /// A request of `n` samples arrived at `now`: if a promise of `n` is due (its client is
    /// most likely this one, back), it is no longer ahead of anyone. Promises long past are
    /// dropped (their clients gave up).
    pub fn arrived(&mut self, now: Instant, n: usize) {
        while self.promised.front().is_some_and(|&(at, _)| at + Duration::from_secs(5) < now) {
            self.promised.pop_front();
        }
        let due = now + Duration::from_millis(500);
        if let Some(i) = self.promised.iter().position(|&(at, k)| at <= due && k == n) {
            self.promised.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_time_counts_rounds_of_a_full_batch() {
        let mut d = DrainEstimate::default();
        // Before a step is timed: the prior pace.
        assert!((d.seconds_for(10, 4, 100) - 3.0 * 100.0 * DrainEstimate::PRIOR_STEP_SECONDS).abs() < 1e-9);
        d.step_done(0.05);
        // 10 samples at 4 per round: 3 rounds of 100 steps of 0.05 s.
        assert!((d.seconds_for(10, 4, 100) - 15.0).abs() < 1e-9);
        // Samples that stop at a fifth of their limit: a fifth of the steps.
        d.sample_done(20, 100);
        assert!((d.seconds_for(4, 4, 100) - 1.0).abs() < 1e-9);
        assert!((d.seconds_for(4, 4, 1000) - 10.0).abs() < 1e-9);
        // Moving averages move a fifth of the way (0.2 to 1.0: 0.36).
        d.sample_done(50, 50);
        assert!((d.used_share.unwrap() - 0.36).abs() < 1e-9);
    }

    #[test]
    fn requests_refused_together_are_told_to_come_back_in_turn() {
        let mut d = DrainEstimate::default();
        d.step_done(0.1);
        let now = Instant::now();
        // A full queue of 8 (batch 4, 20 tokens a sample: 2 s a round, 3 s with the margin):
        // the first 4 refused fit after one round, the next 4 after two.
        let waits: Vec<u64> = (0..8).map(|_| d.retry_after(now, 8, 1, 8, 4, 20)).collect();
        assert_eq!(waits, [3, 3, 3, 3, 6, 6, 6, 6]);
        // A client back at its time takes its promise out: the first four back, refused
        // again, wait behind the four still due later, not behind themselves.
        let back = now + Duration::from_secs(3);
        let again: Vec<u64> = (0..4)
            .map(|_| {
                d.arrived(back, 1);
                d.retry_after(back, 8, 1, 8, 4, 20)
            })
            .collect();
        assert_eq!(again, [6, 6, 6, 6]);
        // Promises long past are dropped.
        let later = now + Duration::from_secs(20);
        d.arrived(later, 2);
        assert!(d.promised.is_empty());
        assert_eq!(d.retry_after(later, 8, 1, 8, 4, 20), 3);
        // Never more than the SDK's limit.
        assert_eq!(d.retry_after(later, 8, 1, 8, 1, 100_000), DrainEstimate::MAX_SECONDS);
    }
}
