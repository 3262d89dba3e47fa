//! GGUF Q4_1 weights against Q8_1 activations.

use super::acts::{padded8, pairs, Q8_1Acts, Q8_1Rows};
use super::kernel::hsum8;
use super::{BlockFormat, QK};
use candle_core::quantized::GgmlDType;
use half::f16;

/// The GGUF / ggml Q4_1 format (ggml's `block_q4_1`): blocks of 32 weights, each stored as an
/// f16 scale `d`, an f16 minimum `m` and 16 bytes of 4-bit quants `q` (20 bytes); weight `j`
/// is `d * q_j + m`, with byte `j` holding `q_j` in its low nibble and `q_{j+16}` in its high
/// nibble.
///
/// Kernel: per block pair, 8 exact i32 partial sums of nibbles times activation quants and
/// `acc = fma(sumi, d4 * d8, acc)` in 8 f32 lanes, then the minimum terms `fma(m4, s8, acc)`
/// 8 blocks at a time (see the module docs of [`super`]).
#[derive(Clone, Copy, Debug)]
pub struct Q4_1;

/// Bytes per Q4_1 block in GGUF: `d: f16, m: f16` and 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;

/// Where things are in one repacked Q4_1 row of `nb` blocks: the `d` scales (f16, padded with
/// zeros to an even count, so block pairs load theirs together), the `m` minimums (f16, padded
/// with zeros to a multiple of 8, so the minimum terms go 8 blocks at a time), then the
/// `nb * 16` nibble bytes (ggml's order, see [`Q4_1`]). The paddings match the activations'
/// ([`Q8_1Acts`]).
#[derive(Clone, Copy, Debug)]
struct RowLayout {
    nb: usize,
}

// Used per tile and in the kernels' setup: inlined wherever they are used.
impl RowLayout {
    /// Block pairs.
    #[inline]
    fn np(self) -> usize {
        pairs(self.nb)
    }
    /// Blocks rounded up to a multiple of 8.
    #[inline]
    fn nb8(self) -> usize {
        padded8(self.nb)
    }
    #[inline]
    fn m_off(self) -> usize {
        4 * self.np()
    }
    #[inline]
    fn nib_off(self) -> usize {
        self.m_off() + 2 * self.nb8()
    }
    #[inline]
    fn row_bytes(self) -> usize {
        self.nib_off() + 16 * self.nb
    }
}

impl BlockFormat for Q4_1 {
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const OP_NAME: &'static str = "q4_1-matmul";
    const BLOCK_VALUES: usize = QK;
    const BLOCK_BYTES: usize = BLOCK_BYTES;
    /// The kernel reads nibbles two blocks (32 bytes) at a time, and for an odd block count
    /// the last read runs 16 bytes past the row (the bytes meet zero activations).
    const PAD: usize = 16;
    type Acts = Q8_1Acts;

    #[inline]
    fn row_bytes(nb: usize) -> usize {
        RowLayout { nb }.row_bytes()
    }

    #[inline]
    fn repack_row(src: &[u8], dst: &mut [u8]) {
        let lay = RowLayout {
            nb: src.len() / BLOCK_BYTES,
        };
        let (ds, rest) = dst.split_at_mut(lay.m_off());
        let (ms, nibbles) = rest.split_at_mut(lay.nib_off() - lay.m_off());
        for (b, blk) in src.chunks_exact(BLOCK_BYTES).enumerate() {
            ds[b * 2..b * 2 + 2].copy_from_slice(&blk[..2]);
            ms[b * 2..b * 2 + 2].copy_from_slice(&blk[2..4]);
            nibbles[b * 16..b * 16 + 16].copy_from_slice(&blk[4..]);
        }
    }

    /// The SIMD kernels' arithmetic lane for lane (`mul_add` is the fused multiply-add): same
    /// bits.
    fn dot_portable<const R: usize>(wrow: &[u8], a: Q8_1Rows<'_>, res: &mut [f32]) {
        let lay = RowLayout { nb: a.nb };
        let (nb, np, nb8) = (lay.nb, lay.np(), lay.nb8());
        let f16_at = |off: usize| f16::from_le_bytes([wrow[off], wrow[off + 1]]).to_f32();
        let nibbles = &wrow[lay.nib_off()..];
        for (r, res) in res[..R].iter_mut().enumerate() {
            let mut acc = [0f32; 8];
            for p in 0..np {
                for h in 0..2 {
                    let b = 2 * p + h;
                    // Missing odd block: zero activations and zero scales, as in the SIMD
                    // kernels (which read whatever bytes follow; any finite value times 0 adds
                    // +-0).
                    let mut q4 = [0u8; QK];
                    if b < nb {
                        for (j, &byte) in nibbles[b * 16..b * 16 + 16].iter().enumerate() {
                            q4[j] = byte & 0x0f;
                            q4[j + 16] = byte >> 4;
                        }
                    }
                    let (lo, hi) = a.halves(r, b);
                    let sc = f16_at(2 * b) * a.d[r * np + p][h * 4];
                    for k in 0..4 {
                        let sumi: i32 = (4 * k..4 * k + 4)
                            .map(|j| q4[j] as i32 * lo[j] as i32 + q4[j + 16] as i32 * hi[j] as i32)
                            .sum();
                        let lane = &mut acc[h * 4 + k];
                        *lane = (sumi as f32).mul_add(sc, *lane);
                    }
                }
            }
            for c in 0..nb8 / 8 {
                for l in 0..8 {
                    let m4 = f16_at(lay.m_off() + 2 * (8 * c + l));
                    acc[l] = m4.mul_add(a.s[r * nb8 + 8 * c + l], acc[l]);
                }
            }
            *res = hsum8(acc);
        }
    }

    /// Per block pair and weight row: 32 nibble bytes split into low and high nibbles (u8
    /// values 0..16 of both blocks, then 16..32), and the two `d` scales spread over the
    /// lanes. Per (weight row, activation row): the 8 exact i32 partial sums (AVX2: `maddubs`
    /// u8 x i8 -> i16 pairs, at most 2 * 15 * 127, added, at most 4 * 15 * 127 so still exact,
    /// and `madd` with ones; VNNI: two `vpdpbusd`), converted (exact) and accumulated with one
    /// multiply and one FMA.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tile_x86<const W: usize, const R: usize, const VNNI: bool>(
        w: &[u8],
        a: Q8_1Rows<'_>,
        res: &mut [f32],
    ) {
        use super::acts::TileRows;
        use super::kernel::x86::{hsum8, PREFETCH};
        use std::arch::x86_64::*;

        let lay = RowLayout { nb: a.nb };
        let (np, nb8, row_bytes) = (lay.np(), lay.nb8(), lay.row_bytes());
        let (m_off, nib_off) = (lay.m_off(), lay.nib_off());
        debug_assert!(
            w.len() >= W * row_bytes + Self::PAD && a.row_count() == R && res.len() >= W * R
        );
        let wp = w.as_ptr();
        let aq = a.qs.as_ptr() as *const __m256i;
        let ad = a.d.as_ptr() as *const f32;
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        let mut acc = [[_mm256_setzero_ps(); R]; W];
        for p in 0..np {
            for i in 0..W {
                // SAFETY (all raw reads): row i < W starts at `i * row_bytes`; the `d` pair of
                // block pair p < np is at `4 * p` (the `d`s are padded to an even count); its
                // 32 nibble bytes at `nib_off + 32 * p`, ending at most 16 bytes past the row,
                // inside `w` (`PAD`). Activation pair p of row r < R is `a.qs[r * np + p]`
                // (64 bytes), its spread scales `a.d[r * np + p]` (8 floats). The prefetch is a
                // hint and never faults.
                let row = wp.add(i * row_bytes);
                let nib = row.add(nib_off + 32 * p);
                _mm_prefetch::<_MM_HINT_T0>((nib as *const i8).wrapping_add(PREFETCH));
                let v = _mm256_loadu_si256(nib as *const __m256i);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                let d2 = _mm_cvtph_ps(_mm_cvtsi32_si128(
                    (row.add(4 * p) as *const i32).read_unaligned(),
                ));
                let dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d2), spread);
                for r in 0..R {
                    let at = r * np + p;
                    let (a0, a1) = (
                        _mm256_loadu_si256(aq.add(2 * at)),
                        _mm256_loadu_si256(aq.add(2 * at + 1)),
                    );
                    let sumi = if VNNI {
                        _mm256_dpbusd_avx_epi32(
                            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, a0),
                            hi,
                            a1,
                        )
                    } else {
                        let s = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, a0),
                            _mm256_maddubs_epi16(hi, a1),
                        );
                        _mm256_madd_epi16(s, ones)
                    };
                    let sc = _mm256_mul_ps(dw, _mm256_loadu_ps(ad.add(8 * at)));
                    acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), sc, acc[i][r]);
                }
            }
        }
        // The minimum terms `m4 * s8`, 8 blocks at a time (both padded with zeros).
        for c in 0..nb8 / 8 {
            for i in 0..W {
                let ms = wp.add(i * row_bytes + m_off + 16 * c) as *const __m128i;
                let m4 = _mm256_cvtph_ps(_mm_loadu_si128(ms));
                for r in 0..R {
                    let s8 = _mm256_loadu_ps(a.s.as_ptr().add(r * nb8 + 8 * c));
                    acc[i][r] = _mm256_fmadd_ps(m4, s8, acc[i][r]);
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
    use super::super::acts::Activations;
    use super::super::kernel::{kernels_here, Kernel};
    use super::super::test_util::*;
    use super::super::Q4_1Matrix;
    use super::*;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// candle's Q4_1 dot debug-asserts an even number of blocks.
    const CANDLE_SHAPES: [(usize, usize); 3] = [(50, 192), (37, 576), (70, 1600)];

    /// A random `[out, inp]` Q4_1 matrix (ours and candle's) and its dequantized f32 values.
    fn weights(out: usize, inp: usize, seed: u64) -> (Q4_1Matrix, QTensor, Tensor) {
        // Offset rows so that the block minimums `m` are not all near -max.
        let noise = randn(seed, out * inp, 0.05);
        let offs = randn(seed + 1000, out, 0.02);
        let w: Vec<f32> = noise
            .iter()
            .enumerate()
            .map(|(i, v)| v + offs[i / inp])
            .collect();
        quantized(&Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap())
    }

    /// From the raw ggml blocks (not our repacked copy) and the quantized activations:
    /// candle's f32 formula (`sum += sumi * d4 * d8 + m4 * s8`, block by block), the same in
    /// f64, and the magnitude `Σ |sumi d4 d8| + |m4 s8|` of the terms summed.
    fn reference(q: &QTensor, x: &Tensor) -> (Matrix<f32>, Matrix<f64>, Matrix<f64>) {
        let (n, inp) = x.dims2().unwrap();
        let out = q.shape().dims()[0];
        let raw = q.data().unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let acts = Q8_1Acts::quantize(&xv, n, inp, Kernel::Scalar);
        let a = acts.rows(0, n);
        let nb = inp / QK;
        let f16_at = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mut f32s = vec![vec![0f32; out]; n];
        let (mut f64s, mut mag) = (vec![vec![0f64; out]; n], vec![vec![0f64; out]; n]);
        for r in 0..n {
            for o in 0..out {
                for b in 0..nb {
                    let wb = &raw[(o * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let (d4, m4) = (f16_at(&wb[..2]), f16_at(&wb[2..4]));
                    let (d8, s8) = (a.scale(r, b), a.s[r * a.nb8() + b]);
                    let (lo, hi) = a.halves(r, b);
                    let sumi: i32 = (0..QK)
                        .map(|j| {
                            let (q, x) = if j < 16 {
                                (wb[4 + j] & 15, lo[j])
                            } else {
                                (wb[4 + j - 16] >> 4, hi[j - 16])
                            };
                            q as i32 * x as i32
                        })
                        .sum();
                    f32s[r][o] += sumi as f32 * d4 * d8 + m4 * s8;
                    let t1 = sumi as f64 * d4 as f64 * d8 as f64;
                    let t2 = m4 as f64 * s8 as f64;
                    f64s[r][o] += t1 + t2;
                    mag[r][o] += t1.abs() + t2.abs();
                }
            }
        }
        (f32s, f64s, mag)
    }

    /// Against the dense f32 matmul of the dequantized weights. The only error is the int8
    /// activation rounding (plus f16 scales): each x_i moves by at most d8/2 = amax/254 of its
    /// block, so |err| <= Σ_blocks amax_b/254 * Σ_i |w_i| (+ the f16 rounding of d8 and s8,
    /// relative 2^-11). We check against that bound, per output element, computed from the
    /// data, and also that the typical error is far below it (random rounding errors cancel).
    #[test]
    fn quant_matches_dequantized_f32_within_int8_bound() {
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, _, deq) = weights(out, inp, seed as u64);
            let wv = rows(&deq);
            for n in BATCHES {
                let x = acts(n, inp);
                let xv = rows(&x);
                let want = rows(&x.matmul(&deq.t().unwrap()).unwrap());
                let got = rows(&m.forward(&x).unwrap());
                let (mut sum_err, mut sum_bound) = (0f64, 0f64);
                for r in 0..n {
                    for o in 0..out {
                        let mut bound = 0f32;
                        for (amax, wabs, xw) in block_terms(&xv[r], &wv[o]) {
                            bound +=
                                amax / 254.0 * wabs + 2.0 * 2f32.powi(-11) * (xw + amax * wabs);
                        }
                        let err = (got[r][o] - want[r][o]).abs();
                        assert!(
                            err <= bound + 1e-5,
                            "shape {out}x{inp} n {n} [{r},{o}]: {} vs {} (err {err}, bound {bound})",
                            got[r][o],
                            want[r][o]
                        );
                        sum_err += err as f64;
                        sum_bound += bound as f64;
                    }
                }
                assert!(
                    sum_err < 0.25 * sum_bound,
                    "shape {out}x{inp} n {n}: mean error {sum_err} too close to the worst case {sum_bound}"
                );
            }
        }
    }

    /// Bound on the f32 rounding of our kernel for `inp` inputs, relative to the magnitude of
    /// the summed terms: per lane `np + nb8 / 8` rounded FMAs (each term's scale product
    /// rounded once more), then 3 levels of the horizontal sum. `unit` = 2^-24.
    fn kernel_bound(inp: usize) -> f64 {
        let lay = RowLayout { nb: inp / QK };
        (lay.np() + lay.nb8() / 8 + 5) as f64 * 2f64.powi(-24)
    }

    /// Against candle's QMatMul: the same quantized operands, only the f32 summation order
    /// differs (ours: 8 lanes of FMAs; candle 0.11.1: `vec_dot_unopt`'s one serial sum). So
    /// both are within their rounding bounds of the exact value of the quantized dot.
    #[test]
    fn quant_matches_candle_qmatmul() {
        for (seed, &(out, inp)) in CANDLE_SHAPES.iter().enumerate() {
            let (m, q, _) = weights(out, inp, 10 + seed as u64);
            // The same matrix again (QTensor is not Clone).
            let theirs = QMatMul::from_qtensor(weights(out, inp, 10 + seed as u64).1).unwrap();
            let candle_bound = (inp / QK + 3) as f64 * 2f64.powi(-24);
            let mut differ = 0;
            for n in BATCHES {
                let x = acts(n, inp);
                let (_, val, mag) = reference(&q, &x);
                let want = rows(&theirs.forward(&x).unwrap());
                let got = rows(&m.forward(&x).unwrap());
                for r in 0..n {
                    for o in 0..out {
                        let tol = (kernel_bound(inp) + candle_bound) * mag[r][o];
                        let err = (got[r][o] as f64 - want[r][o] as f64).abs();
                        assert!(
                            err <= tol,
                            "shape {out}x{inp} n {n} [{r},{o}]: ours {} candle {} (exact {}, tol {tol})",
                            got[r][o],
                            want[r][o],
                            val[r][o]
                        );
                        differ += (got[r][o] != want[r][o]) as usize;
                    }
                }
            }
            // The orders do differ: were every value equal, this test would not be checking
            // a tolerance at all.
            assert!(
                differ > 0,
                "shape {out}x{inp}: identical to candle everywhere"
            );
        }
    }

    /// Every kernel this CPU has gives the portable kernel's bits (odd block counts included,
    /// which candle does not take), and each is within its rounding bound of the f64 value of
    /// the quantized dot.
    #[test]
    fn quant_simd_kernels_match_scalar() {
        let kernels = kernels_here();
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, q, _) = weights(out, inp, 20 + seed as u64);
            for n in BATCHES {
                let x = acts(n, inp);
                let (_, val, mag) = reference(&q, &x);
                let want = run(&m, &x, Kernel::Scalar);
                for &k in &kernels {
                    let y = run(&m, &x, k);
                    for r in 0..n {
                        assert_eq!(
                            bits(&y[r]),
                            bits(&want[r]),
                            "{k:?} shape {out}x{inp} n {n} row {r}"
                        );
                        for o in 0..out {
                            let err = (y[r][o] as f64 - val[r][o]).abs();
                            assert!(
                                err <= kernel_bound(inp) * mag[r][o],
                                "{k:?} shape {out}x{inp} n {n} [{r},{o}]: {} vs {} (magnitude {})",
                                y[r][o],
                                val[r][o],
                                mag[r][o]
                            );
                        }
                    }
                }
            }
        }
    }

    /// A row computed inside a batch is bitwise the row computed alone, through the public
    /// (parallel, row-grouping) forward and through each kernel.
    #[test]
    fn quant_batch_rows_equal_single_rows_bitwise() {
        let kernels = kernels_here();
        for (seed, &(out, inp)) in SHAPES.iter().enumerate() {
            let (m, _, _) = weights(out, inp, 30 + seed as u64);
            for n in BATCHES {
                forward_batch_independent(&m, &acts(n, inp), &kernels);
            }
        }
    }

    /// Leading dimensions are kept, `[a, b, in] -> [a, b, out]`, and equal the flat result.
    #[test]
    fn quant_keeps_leading_dims() {
        let (m, _, _) = weights(40, 64, 40);
        let x = acts(6, 64);
        let flat = m.forward(&x).unwrap();
        let y = m.forward(&x.reshape((2, 3, 64)).unwrap()).unwrap();
        assert_eq!(y.dims(), &[2, 3, 40]);
        assert_eq!(rows(&y.reshape((6, 40)).unwrap()), rows(&flat));
    }

    #[test]
    fn quant_from_qtensor_only_takes_q4_1() {
        assert_only_takes::<Q4_1>([GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::F32]);
    }
}
