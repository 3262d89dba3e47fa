//! The device sampler (`kernels/sampler.cu`) as a candle custom op: `[rows, vocab]` f32
//! logits on the GPU in, `[2 * rows]` u32 out (tokens, then the log-probs' f32 bits), so
//! only `8 * rows` bytes cross to the host. On a CPU tensor the op runs the kernel's Rust
//! model ([`super::radix`]), so both devices run the same algorithm.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape};

use super::cpu::SamplingParams;
use super::philox::StreamKey;
use super::radix;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampler.ptx"));

/// Sampling parameters and stream coordinates of every row, for one launch.
pub struct SampleOp {
    pub params: Vec<SamplingParams>,
    pub keys: Vec<StreamKey>,
    pub steps: Vec<u64>,
    /// Use the kernel without warp-aggregated histogram atomics (A/B checks).
    pub plain: bool,
}

impl SampleOp {
    /// Per row: Philox key words then counter words, as the kernel reads them.
    fn stream_words(&self) -> Vec<u32> {
        self.keys
            .iter()
            .zip(&self.steps)
            .flat_map(|(k, &s)| {
                let [k0, k1] = k.key_words();
                let [c0, c1, c2, c3] = k.counter(s);
                [k0, k1, c0, c1, c2, c3]
            })
            .collect()
    }

    fn dims(&self, layout: &Layout) -> candle_core::Result<(usize, usize)> {
        let (rows, vocab) = layout.shape().dims2()?;
        if rows != self.params.len() || rows != self.keys.len() || rows != self.steps.len() {
            candle_core::bail!(
                "sampler: {rows} logit rows but {} params, {} keys, {} steps",
                self.params.len(),
                self.keys.len(),
                self.steps.len()
            );
        }
        if !layout.is_contiguous() {
            candle_core::bail!("sampler: the logits must be contiguous");
        }
        Ok((rows, vocab))
    }
}

impl CustomOp1 for SampleOp {
    fn name(&self) -> &'static str {
        "bsa-sample"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = self.dims(layout)?;
        let logits = &storage.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + rows * vocab];
        let drawn = radix::sample_batch(logits, vocab, &self.params, &self.keys, &self.steps);
        let mut out: Vec<u32> = drawn.iter().map(|d| d.token).collect();
        out.extend(drawn.iter().map(|d| d.logprob.to_bits()));
        Ok((CpuStorage::U32(out), Shape::from(2 * rows)))
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, vocab) = self.dims(layout)?;
        let dev = &storage.device;
        let logits = storage.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
        let temp: Vec<f32> = self.params.iter().map(|p| p.temperature).collect();
        let top_k: Vec<u32> = self
            .params
            .iter()
            .map(|p| p.top_k.min(u32::MAX as usize) as u32)
            .collect();
        let top_p: Vec<f32> = self.params.iter().map(|p| p.top_p).collect();
        let min_p: Vec<f32> = self.params.iter().map(|p| p.min_p).collect();
        let (temp, top_k, top_p, min_p) = (
            dev.clone_htod(&temp)?,
            dev.clone_htod(&top_k)?,
            dev.clone_htod(&top_p)?,
            dev.clone_htod(&min_p)?,
        );
        let streams = dev.clone_htod(&self.stream_words())?;
        let out = dev.alloc_zeros::<u32>(2 * rows)?;
        let name = if self.plain {
            "bsa_sample_rows_plain"
        } else {
            "bsa_sample_rows"
        };
        let func = dev.get_or_load_custom_func(name, "bsa_sampler", PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let vocab = vocab as u32;
        let want_logprobs = 1u32;
        let mut b = func.builder();
        b.arg(&logits);
        b.arg(&vocab);
        b.arg(&temp);
        b.arg(&top_k);
        b.arg(&top_p);
        b.arg(&min_p);
        b.arg(&streams);
        b.arg(&out);
        b.arg(&want_logprobs);
        // SAFETY: argument types and order match bsa_sample_rows; every buffer holds the
        // lengths the kernel reads (rows x vocab logits, rows params, 6 rows stream words,
        // 2 rows outputs).
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(2 * rows)))
    }
}
