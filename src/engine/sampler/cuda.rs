//! The device sampler (`kernels/sampler.cu`) as a candle custom op: `[rows, vocab]` f32
//! logits on the GPU in, `[2 * rows]` u32 out (tokens, then the log-probs' f32 bits), so
//! only `8 * rows` bytes cross to the host. On a CPU tensor the op runs the kernel's Rust
//! model ([`super::radix`]), so both devices run the same algorithm.

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Storage, Tensor};

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
        let (logits, vocab, params, out) = self.prepare(storage, layout)?;
        let dev = &storage.device;
        self.launch(dev, &logits, vocab, &params, &out)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(2 * self.params.len())))
    }
}

/// The per-row inputs of a launch, on the device.
struct DeviceParams {
    temp: CudaSlice<f32>,
    top_k: CudaSlice<u32>,
    top_p: CudaSlice<f32>,
    min_p: CudaSlice<f32>,
    streams: CudaSlice<u32>,
}

impl SampleOp {
    /// What a launch on `storage` needs: the logits, the vocabulary size, the parameters
    /// uploaded, and a zeroed `[2 * rows]` output.
    fn prepare<'a>(&self, storage: &'a CudaStorage, layout: &Layout) -> candle_core::Result<(CudaView<'a, f32>, usize, DeviceParams, CudaSlice<u32>)> {
        let (rows, vocab) = self.dims(layout)?;
        let dev = &storage.device;
        let logits = storage.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
        Ok((logits, vocab, self.upload(dev)?, dev.alloc_zeros::<u32>(2 * rows)?))
    }

    fn upload(&self, dev: &CudaDevice) -> candle_core::Result<DeviceParams> {
        let temp: Vec<f32> = self.params.iter().map(|p| p.temperature).collect();
        let top_k: Vec<u32> = self.params.iter().map(|p| p.top_k.min(u32::MAX as usize) as u32).collect();
        let top_p: Vec<f32> = self.params.iter().map(|p| p.top_p).collect();
        let min_p: Vec<f32> = self.params.iter().map(|p| p.min_p).collect();
        Ok(DeviceParams {
            temp: dev.clone_htod(&temp)?,
            top_k: dev.clone_htod(&top_k)?,
            top_p: dev.clone_htod(&top_p)?,
            min_p: dev.clone_htod(&min_p)?,
            streams: dev.clone_htod(&self.stream_words())?,
        })
    }

    fn launch(
        &self,
        dev: &CudaDevice,
        logits: &CudaView<f32>,
        vocab: usize,
        p: &DeviceParams,
        out: &CudaSlice<u32>,
    ) -> candle_core::Result<()> {
        let name = if self.plain { "bsa_sample_rows_plain" } else { "bsa_sample_rows" };
        let func = dev.get_or_load_custom_func(name, "bsa_sampler", PTX)?;
        let cfg = LaunchConfig { grid_dim: (self.params.len() as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let vocab = vocab as u32;
        let want_logprobs = 1u32;
        let mut b = func.builder();
        b.arg(logits);
        b.arg(&vocab);
        b.arg(&p.temp);
        b.arg(&p.top_k);
        b.arg(&p.top_p);
        b.arg(&p.min_p);
        b.arg(&p.streams);
        b.arg(out);
        b.arg(&want_logprobs);
        // SAFETY: argument types and order match bsa_sample_rows; every buffer holds the
        // lengths the kernel reads (rows x vocab logits, rows params, 6 rows stream words,
        // 2 rows outputs).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// Seconds per launch of the kernel alone (parameters uploaded once, `iters`
    /// back-to-back launches, one synchronisation): what the bandwidth floor is compared to.
    pub fn kernel_seconds(&self, logits: &Tensor, iters: usize) -> candle_core::Result<f64> {
        let (st, layout) = logits.storage_and_layout();
        let Storage::Cuda(storage) = &*st else {
            candle_core::bail!("kernel_seconds needs CUDA logits");
        };
        let (view, vocab, params, out) = self.prepare(storage, layout)?;
        let dev = &storage.device;
        self.launch(dev, &view, vocab, &params, &out)?;
        dev.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..iters.max(1) {
            self.launch(dev, &view, vocab, &params, &out)?;
        }
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
    }
}
