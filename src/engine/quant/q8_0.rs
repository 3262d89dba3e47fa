//! GGUF Q8_0 weights against Q8_0 activations.

use super::acts::{Q8_0Acts, Q8_0Rows};
use super::kernel::hsum8;
use super::{BlockFormat, QK};
use candle_core::quantized::GgmlDType;
use half::f16;

/// The GGUF / ggml Q8_0 format (ggml's `block_q8_0`): blocks of 32 weights, each stored as an
/// f16 scale `d` and 32 i8 quants `q` (34 bytes); weight `j` is `d * q_j`.
///
/// GGUF files often keep the token embedding, and with it a tied output head, in Q8_0
/// (SmolLM2-135M Q4_1 does): candle's Q8_0 matmul has an AVX dot but still runs it per
/// activation row, converting the f16 scales every time, which made the head a quarter of
/// batched decode time. Numerics are candle's AVX ones (`vec_dot_q8_0_q8_0`) bit for bit: per
/// block `d = dw * dx`, 8 exact i32 lane sums of `w * x`, `acc = fma(d, lanes, acc)`
/// lane-wise, and candle's horizontal sum at the end.
///
/// Our row `o` occupies `row_bytes = nb * 34` bytes at `o * row_bytes`: the `nb` f16 scales
/// (2 bytes each), then the `nb * 32` quants.
#[derive(Clone, Copy, Debug)]
pub struct Q8_0;

/// Bytes per Q8_0 block: `d: f16` and 32 i8 quants.
const BLOCK_BYTES: usize = 34;

impl BlockFormat for Q8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const OP_NAME: &'static str = "q8_0-matmul";
    const BLOCK_VALUES: usize = QK;
    const BLOCK_BYTES: usize = BLOCK_BYTES;
    /// The kernels read nothing past a row.
    const PAD: usize = 0;
    type Acts = Q8_0Acts;

    #[inline]
    fn row_bytes(nb: usize) -> usize {
        nb * BLOCK_BYTES
    }

    #[inline]
    fn repack_row(src: &[u8], dst: &mut [u8]) {
        let (scales, quants) = dst.split_at_mut(src.len() / BLOCK_BYTES * 2);
        for (b, blk) in src.chunks_exact(BLOCK_BYTES).enumerate() {
            scales[b * 2..b * 2 + 2].copy_from_slice(&blk[..2]);
            quants[b * QK..(b + 1) * QK].copy_from_slice(&blk[2..]);
        }
    }

    /// The AVX kernel's arithmetic (8 lanes, `mul_add` = FMA, the same horizontal sum): same
    /// bits.
    fn dot_portable<const R: usize>(wrow: &[u8], a: Q8_0Rows<'_>, res: &mut [f32]) {
        let nb = a.nb;
        let (scales, quants) = wrow.split_at(nb * 2);
        let mut acc = [[0f32; 8]; R];
        for b in 0..nb {
            let dw = f16::from_le_bytes([scales[b * 2], scales[b * 2 + 1]]).to_f32();
            let wq = &quants[b * QK..(b + 1) * QK];
            for r in 0..R {
                let i = r * nb + b;
                let d = dw * a.d[i];
                for (k, acc) in acc[r].iter_mut().enumerate() {
                    let lane: i32 = (4 * k..4 * k + 4)
                        .map(|j| wq[j] as i8 as i32 * a.qs[i][j] as i32)
                        .sum();
                    *acc = (lane as f32).mul_add(d, *acc);
                }
            }
        }
        for r in 0..R {
            res[r] = hsum8(acc[r]);
        }
    }

    /// Per block: `|w|` (u8) times `x` signed by `w` (`maddubs`, at most 2 * 128 * 127 per
    /// pair, so no saturation), `madd` with ones: 8 exact i32 lane sums; `fma` with the
    /// broadcast `dw * dx` into 8 f32 lanes; candle's horizontal sum at the end. `|w|` and
    /// `dw` are computed once per weight block for all R rows. With `VNNI`, one `vpdpbusd` of
    /// `|w|` and the signed `x` gives the same exact lane sums as `maddubs` + `madd`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tile_x86<const W: usize, const R: usize, const VNNI: bool>(
        w: &[u8],
        a: Q8_0Rows<'_>,
        res: &mut [f32],
    ) {
        use super::kernel::x86::{hsum8, PREFETCH};
        use std::arch::x86_64::*;

        let nb = a.nb;
        let row_bytes = nb * BLOCK_BYTES;
        debug_assert!(w.len() >= W * row_bytes && a.qs.len() >= R * nb && res.len() >= W * R);
        let wp = w.as_ptr();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); R]; W];
        for b in 0..nb {
            let mut wq = [_mm256_setzero_si256(); W];
            let mut wabs = [_mm256_setzero_si256(); W];
            let mut dw = [0f32; W];
            for i in 0..W {
                // SAFETY: row i < W: the scale of block b < nb is at byte
                // `i * row_bytes + 2 * b`, its 32 quants at `i * row_bytes + 2 * nb + 32 * b`,
                // inside `w`. The prefetch is a hint and never faults.
                let row = wp.add(i * row_bytes);
                let q = row.add(2 * nb + QK * b);
                _mm_prefetch::<_MM_HINT_T0>((q as *const i8).wrapping_add(PREFETCH));
                wq[i] = _mm256_loadu_si256(q as *const __m256i);
                wabs[i] = _mm256_sign_epi8(wq[i], wq[i]);
                let h = (row.add(2 * b) as *const u16).read_unaligned();
                dw[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)));
            }
            for r in 0..R {
                // SAFETY: activation block b of row r < R.
                let x = _mm256_loadu_si256(a.qs.as_ptr().add(r * nb + b) as *const __m256i);
                let dx = a.d[r * nb + b];
                for i in 0..W {
                    let sx = _mm256_sign_epi8(x, wq[i]);
                    let lanes = if VNNI {
                        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wabs[i], sx)
                    } else {
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[i], sx), ones)
                    };
                    let d = _mm256_set1_ps(dw[i] * dx);
                    acc[i][r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[i][r]);
                }
            }
        }
        for i in 0..W {
            for r in 0..R {
                res[i * R + r] = hsum8(acc[i][r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernel::{kernel, kernels_here, Kernel};
    use super::super::test_util::*;
    use super::super::Q8_0Matrix;
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// A random `[out, inp]` Q8_0 matrix (ours and candle's) and its dequantized f32 values.
    fn q8_weights(out: usize, inp: usize, seed: u64) -> (Q8_0Matrix, QTensor, Tensor) {
        let w = Tensor::from_vec(randn(seed, out * inp, 0.05), (out, inp), &Device::Cpu).unwrap();
        quantized(&w)
    }

    /// Q8_0 against candle's QMatMul: with AVX2 the same operations in the same order as
    /// candle's `vec_dot_q8_0_q8_0`, so equal bits (in_features are not multiples of 256, where
    /// candle would switch to its repacked kernels on VNNI CPUs). Without AVX2 candle runs its
    /// scalar dot, in another order: then within 1e-5 of the row's scale.
    #[test]
    fn quant_q8_0_matches_candle_qmatmul() {
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, q, _) = q8_weights(out, inp, 50 + seed as u64);
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for n in BATCHES {
                let x = acts(n, inp);
                let want = rows(&theirs.forward(&x).unwrap());
                let got = rows(&m.forward(&x).unwrap());
                for r in 0..n {
                    if kernel() != Kernel::Scalar {
                        assert_eq!(
                            bits(&got[r]),
                            bits(&want[r]),
                            "shape {out}x{inp} n {n} row {r}"
                        );
                    } else {
                        let scale = want[r].iter().fold(0f32, |a, v| a.max(v.abs()));
                        for (g, w) in got[r].iter().zip(&want[r]) {
                            assert!((g - w).abs() <= 1e-5 * scale, "{g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    /// Q8_0: the kernels give the same bits, a row in a batch gives the bits it gets alone,
    /// and the result is within the int8 activation bound of the dense f32 matmul (the
    /// weights dequantize exactly, so only the activations' rounding, at most amax/254 per
    /// value, and their f16 scale, 2^-11 relative, contribute).
    #[test]
    fn quant_q8_0_kernels_batch_independence_and_accuracy() {
        let kernels = kernels_here();
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, _, deq) = q8_weights(out, inp, 60 + seed as u64);
            let wv = rows(&deq);
            for n in BATCHES {
                let x = acts(n, inp);
                let xv = rows(&x);
                let batch = forward_batch_independent(&m, &x, &kernels);
                let want = rows(&x.matmul(&deq.t().unwrap()).unwrap());
                for r in 0..n {
                    for o in 0..out {
                        let mut bound = 0f32;
                        for (amax, wabs, xw) in block_terms(&xv[r], &wv[o]) {
                            bound += amax / 254.0 * wabs + 2f32.powi(-11) * xw;
                        }
                        let err = (batch[r][o] - want[r][o]).abs();
                        assert!(
                            err <= bound + 1e-5,
                            "shape {out}x{inp} n {n} [{r},{o}]: err {err} bound {bound}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quant_q8_0_from_qtensor_only_takes_q8_0() {
        assert_only_takes::<Q8_0>([GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::F32]);
    }
}
