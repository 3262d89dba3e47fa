//! Sampling where the logits are: the entry point the scheduler calls with the model's
//! logits tensor. On a CUDA device the rows are sampled by the device kernel and only the
//! token ids come back; elsewhere the rows are copied to the host and sampled by the exact
//! CPU reference. The device is a parameter, not a fork: the caller does not know which.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use super::cpu::{sample_batch, SamplingParams};
use super::philox::StreamKey;

/// Samples row `row_src[i]` of `logits` (`[m, vocab]`) with `params[i]` and the uniform
/// `keys[i].uniform(steps[i])`; one token per entry of `row_src` (a prompt's row can serve
/// several samples).
pub fn sample_logits(
    logits: &Tensor,
    row_src: &[usize],
    params: &[SamplingParams],
    keys: &[StreamKey],
    steps: &[u64],
) -> Result<Vec<u32>> {
    ensure!(
        row_src.len() == params.len() && params.len() == keys.len() && keys.len() == steps.len(),
        "sampler: {} rows but {} params, {} keys, {} steps",
        row_src.len(),
        params.len(),
        keys.len(),
        steps.len()
    );
    if row_src.is_empty() {
        return Ok(Vec::new());
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && !host_sampling_forced() {
        return sample_on_cuda(logits, row_src, params, keys, steps, false).map(|d| d.0);
    }
    let (_, vocab) = logits.dims2()?;
    let rows: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut expanded = Vec::with_capacity(row_src.len() * vocab);
    for &r in row_src {
        expanded.extend_from_slice(&rows[r * vocab..(r + 1) * vocab]);
    }
    Ok(sample_batch(&expanded, vocab, params, keys, steps))
}

/// `BSA_SAMPLER=host` samples on the host even when the logits are on a GPU (A/B checks).
#[cfg(feature = "cuda")]
fn host_sampling_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("BSA_SAMPLER").is_ok_and(|v| v == "host"))
}

/// The device kernel on CUDA logits: tokens and their log-probs.
#[cfg(feature = "cuda")]
pub fn sample_on_cuda(
    logits: &Tensor,
    row_src: &[usize],
    params: &[SamplingParams],
    keys: &[StreamKey],
    steps: &[u64],
    plain: bool,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let logits = logits.to_dtype(DType::F32)?;
    let identity = row_src.iter().enumerate().all(|(i, &r)| i == r) && row_src.len() == logits.dim(0)?;
    let rows = if identity {
        logits.contiguous()?
    } else {
        let idx: Vec<u32> = row_src.iter().map(|&r| r as u32).collect();
        logits
            .index_select(&Tensor::new(idx.as_slice(), logits.device())?, 0)?
            .contiguous()?
    };
    let op = super::cuda::SampleOp {
        params: params.to_vec(),
        keys: keys.to_vec(),
        steps: steps.to_vec(),
        plain,
    };
    let out: Vec<u32> = rows.apply_op1_no_bwd(&op)?.to_vec1()?;
    let n = row_src.len();
    Ok((out[..n].to_vec(), out[n..].iter().map(|&b| f32::from_bits(b)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn host_path_expands_shared_rows() {
        let logits = Tensor::new(&[[0.0f32, 5.0, 1.0], [9.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let g = SamplingParams::greedy();
        let keys = [StreamKey::new(1, "a", 0); 3];
        let got = sample_logits(&logits, &[1, 0, 1], &[g; 3], &keys, &[0, 0, 0]).unwrap();
        assert_eq!(got, vec![0, 1, 0]);
        let err = sample_logits(&logits, &[0], &[g; 2], &keys[..1], &[0]).unwrap_err();
        assert_eq!(err.to_string(), "sampler: 1 rows but 2 params, 1 keys, 1 steps");
    }
}
