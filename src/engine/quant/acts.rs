//! Activation rows quantized to int8 blocks as candle quantizes them (`BlockQ8_1::from_float`,
//! `BlockQ8_0::from_float`), so that ours and candle's QMatMul see the same operands, and the
//! layouts the kernels read them in.
//!
//! Per block of 32 values: `d = max|x| / 127`, `q = round_half_away(x / d)` (0 for an all-zero
//! block), `d` rounded to f16 and `s = d * Σq` (Q8_1 only) computed and rounded in f16 as
//! candle does. The AVX2 quantizer performs the same IEEE operations as the scalar one: same
//! bits.

use super::kernel::Kernel;
use super::QK;
use half::f16;

/// One tile of activation rows, as a format's kernels take them.
pub trait TileRows: Copy {
    /// Activation rows in the tile.
    fn row_count(&self) -> usize;
    /// Blocks per row.
    fn blocks(&self) -> usize;
}

/// Quantized activation rows in one layout. Implementations keep the invariant the kernels'
/// raw reads rely on: `rows(r0, nr)` holds exactly the data of rows `r0..r0 + nr`.
pub trait Activations: Sized + Sync {
    /// A tile of rows.
    type Rows<'a>: TileRows
    where
        Self: 'a;

    /// `n` rows of `nb` blocks, all zero.
    fn zeroed(n: usize, nb: usize) -> Self;

    /// Stores block `b` of row `r`: its quants, `d` and `s` (f16 values).
    fn set_block(&mut self, r: usize, b: usize, q: &[i8; QK], d: f32, s: f32);

    /// Rows `r0..r0 + nr`.
    fn rows(&self, r0: usize, nr: usize) -> Self::Rows<'_>;

    /// `n` rows of `inp` f32 values (a multiple of 32), quantized with `kernel`'s quantizer
    /// (every kernel gives the same bits).
    fn quantize(x: &[f32], n: usize, inp: usize, kernel: Kernel) -> Self {
        assert_eq!(x.len(), n * inp);
        let nb = inp / QK;
        let mut a = Self::zeroed(n, nb);
        for (i, xb) in x.chunks_exact(QK).enumerate() {
            let (q, d, s) = quantize_block(kernel, xb);
            a.set_block(i / nb, i % nb, &q, d, s);
        }
        a
    }
}

/// Block pairs in a row of `nb` blocks (an odd last block is paired with zeros).
#[inline]
pub(super) fn pairs(nb: usize) -> usize {
    nb.div_ceil(2)
}

/// `nb` rounded up to a multiple of 8 (the minimum terms of Q4_1 go 8 blocks at a time).
#[inline]
pub(super) fn padded8(nb: usize) -> usize {
    nb.div_ceil(8) * 8
}

/// Activations for 4-bit weights (Q4_1): candle's Q8_1 (`d` and `s` per block), with the
/// quants of each row in pairs of blocks laid out to match how 32 bytes of nibbles (blocks
/// `2p` and `2p + 1`) unpack: 64 bytes holding values 0..16 of block `2p`, then 0..16 of
/// `2p + 1` (the low nibbles), then values 16..32 of each (the high nibbles). An odd last
/// block is paired with zeros. The scales come ready for the kernel's lanes.
pub struct Q8_1Acts {
    nb: usize,
    /// `n * np` block pairs.
    qs: Vec<[i8; 2 * QK]>,
    /// Per block pair, `d` of block `2p` in lanes 0..4 and of `2p + 1` in lanes 4..8 (the
    /// lanes holding those blocks' partial sums); zero for a missing odd block.
    d: Vec<[f32; 8]>,
    /// Block sums `s = d * Σq`, `nb8` per row (zero past `nb`).
    s: Vec<f32>,
}

/// Rows `r0..r0 + n` of a [`Q8_1Acts`], exactly those rows' data.
#[derive(Clone, Copy)]
pub struct Q8_1Rows<'a> {
    pub(super) nb: usize,
    n: usize,
    pub(super) qs: &'a [[i8; 2 * QK]],
    pub(super) d: &'a [[f32; 8]],
    pub(super) s: &'a [f32],
}

impl Q8_1Acts {
    #[inline]
    fn np(&self) -> usize {
        pairs(self.nb)
    }

    #[inline]
    fn nb8(&self) -> usize {
        padded8(self.nb)
    }
}

// The per-block and per-tile methods here are `#[inline]`: the generic driver calling them is
// compiled in other codegen units, where a plain function would stay a call.
impl Activations for Q8_1Acts {
    type Rows<'a> = Q8_1Rows<'a>;

    fn zeroed(n: usize, nb: usize) -> Self {
        let (np, nb8) = (pairs(nb), padded8(nb));
        Q8_1Acts {
            nb,
            qs: vec![[0; 2 * QK]; n * np],
            d: vec![[0.0; 8]; n * np],
            s: vec![0.0; n * nb8],
        }
    }

    #[inline]
    fn set_block(&mut self, r: usize, b: usize, q: &[i8; QK], d: f32, s: f32) {
        let (np, nb8) = (self.np(), self.nb8());
        let h = (b % 2) * 16;
        let pair = &mut self.qs[r * np + b / 2];
        pair[h..h + 16].copy_from_slice(&q[..16]);
        pair[QK + h..QK + h + 16].copy_from_slice(&q[16..]);
        self.d[r * np + b / 2][(b % 2) * 4..][..4].fill(d);
        self.s[r * nb8 + b] = s;
    }

    #[inline]
    fn rows(&self, r0: usize, nr: usize) -> Q8_1Rows<'_> {
        let (np, nb8) = (self.np(), self.nb8());
        Q8_1Rows {
            nb: self.nb,
            n: nr,
            qs: &self.qs[r0 * np..(r0 + nr) * np],
            d: &self.d[r0 * np..(r0 + nr) * np],
            s: &self.s[r0 * nb8..(r0 + nr) * nb8],
        }
    }
}

impl<'a> Q8_1Rows<'a> {
    #[inline]
    pub(super) fn np(&self) -> usize {
        pairs(self.nb)
    }

    /// Length of each row's block sums `s`.
    #[cfg(test)]
    pub(super) fn nb8(&self) -> usize {
        padded8(self.nb)
    }

    /// Values 0..16 and 16..32 of block `b` of row `r`.
    #[inline]
    pub(super) fn halves(&self, r: usize, b: usize) -> (&'a [i8], &'a [i8]) {
        let pair: &'a [i8; 2 * QK] = &self.qs[r * self.np() + b / 2];
        let h = (b % 2) * 16;
        (&pair[h..h + 16], &pair[QK + h..QK + h + 16])
    }

    /// `d` of block `b` of row `r`.
    #[cfg(test)]
    pub(super) fn scale(&self, r: usize, b: usize) -> f32 {
        self.d[r * self.np() + b / 2][(b % 2) * 4]
    }
}

/// Activations for 8-bit weights (Q8_0): candle's Q8_0 (the Q8_1 quantization without `s`),
/// quants in their natural order, block `b` of row `r` at `r * nb + b`.
pub struct Q8_0Acts {
    nb: usize,
    qs: Vec<[i8; QK]>,
    d: Vec<f32>,
}

/// Rows `r0..r0 + n` of a [`Q8_0Acts`], exactly those rows' data.
#[derive(Clone, Copy)]
pub struct Q8_0Rows<'a> {
    pub(super) nb: usize,
    n: usize,
    pub(super) qs: &'a [[i8; QK]],
    pub(super) d: &'a [f32],
}

impl Activations for Q8_0Acts {
    type Rows<'a> = Q8_0Rows<'a>;

    fn zeroed(n: usize, nb: usize) -> Self {
        Q8_0Acts {
            nb,
            qs: vec![[0; QK]; n * nb],
            d: vec![0.0; n * nb],
        }
    }

    #[inline]
    fn set_block(&mut self, r: usize, b: usize, q: &[i8; QK], d: f32, _s: f32) {
        let i = r * self.nb + b;
        (self.qs[i], self.d[i]) = (*q, d);
    }

    #[inline]
    fn rows(&self, r0: usize, nr: usize) -> Q8_0Rows<'_> {
        let nb = self.nb;
        Q8_0Rows {
            nb,
            n: nr,
            qs: &self.qs[r0 * nb..(r0 + nr) * nb],
            d: &self.d[r0 * nb..(r0 + nr) * nb],
        }
    }
}

/// [`TileRows`] for row types keeping their row count in `n` and blocks per row in `nb`.
macro_rules! tile_rows {
    ($($rows:ident),*) => {$(
        impl TileRows for $rows<'_> {
            #[inline]
            fn row_count(&self) -> usize {
                self.n
            }

            #[inline]
            fn blocks(&self) -> usize {
                self.nb
            }
        }
    )*};
}

tile_rows!(Q8_1Rows, Q8_0Rows);

/// One activation block quantized: quants, `d` and `s` (both f16 values). Same bits from
/// every kernel.
#[inline]
fn quantize_block(kernel: Kernel, xb: &[f32]) -> ([i8; QK], f32, f32) {
    match kernel {
        Kernel::Scalar => quantize_block_scalar(xb),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: these kernels are chosen only on CPUs with avx2, fma and f16c; the
        // function checks the block length itself.
        Kernel::Avx2 | Kernel::Vnni => unsafe { x86::quantize_block(xb) },
    }
}

/// One block: quants, `d` and `s` (both f16 values).
fn quantize_block_scalar(xb: &[f32]) -> ([i8; QK], f32, f32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(xb) {
        let r = round_half_away(v * id);
        *q = r as i8;
        sum += r;
    }
    let d16 = round_f16(d);
    (qs, d16, round_f16(round_f16(sum as f32) * d16))
}

/// `f32::round` (half away from zero) for |v| <= 127, without the libm call it compiles to on
/// baseline x86_64: truncate, then step away from zero when the (exact) remainder is >= 0.5.
#[inline]
fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// `x` rounded to the nearest f16 value (ties to even, as F16C and candle round), as f32.
fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::QK;
    use std::arch::x86_64::*;

    /// [`super::quantize_block_scalar`] with the same operations, 8 lanes at a time: the
    /// absolute maximum (exact in any order), `x * id`, truncation and the +-0.5 remainder
    /// test, and F16C's round-to-nearest-even for the f16 scales.
    ///
    /// # Safety
    /// The CPU must support avx2 and f16c; `xb` must hold 32 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(xb: &[f32]) -> ([i8; QK], f32, f32) {
        assert!(xb.len() >= QK);
        // SAFETY: four 8-float loads within the 32 checked above.
        let x = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(xb.as_ptr().add(i)));
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let m = x.map(|v| _mm256_and_ps(v, abs_mask));
        let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let half = _mm256_set1_ps(0.5);
        let neg_half = _mm256_set1_ps(-0.5);
        let q = x.map(|v| {
            let v = _mm256_mul_ps(v, id);
            let t = _mm256_cvttps_epi32(v);
            let frac = _mm256_sub_ps(v, _mm256_cvtepi32_ps(t));
            // Compare masks are -1 where true: subtract to step up, add to step down.
            let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half));
            let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, neg_half));
            _mm256_add_epi32(_mm256_sub_epi32(t, up), down)
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
        // Pack to i8 (values are within -127..=127, no saturation); packs interleave the
        // 128-bit lanes, and the permute puts the 32 values back in order.
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let qs: [i8; QK] = std::mem::transmute(p);
        let d16 = round_f16(d);
        (qs, d16, round_f16(round_f16(sum as f32) * d16))
    }

    /// `x` rounded to the nearest f16 (ties to even) with F16C, as f32: inlined into the
    /// quantizer, where `half`'s conversion would be a call behind a run-time feature check.
    #[target_feature(enable = "f16c")]
    pub(super) fn round_f16(x: f32) -> f32 {
        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
        _mm_cvtss_f32(_mm_cvtph_ps(h))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    use super::super::kernel::kernel;
    use super::super::test_util::randn;
    #[cfg(target_arch = "x86_64")]
    use super::super::test_util::{acts, bits};
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// The AVX2 activation quantization gives the scalar one's bits, on random data and on
    /// blocks with exact halves, zeros and extreme ranges.
    #[test]
    fn quant_avx2_activation_quantization_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        {
            if kernel() == Kernel::Scalar {
                eprintln!("*** SKIPPED: no avx2+fma+f16c on this CPU ***");
                return;
            }
            let mut x = acts(64, 256)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // Block 0: all zeros. Block 1: amax 127 so x * id hits exact halves.
            x[..32].fill(0.0);
            for j in 0..32 {
                x[32 + j] = if j == 0 {
                    127.0
                } else {
                    (j as f32 - 16.0) + 0.5
                };
            }
            // Blocks 2, 3: tiny and huge magnitudes (f16-subnormal and overflowing scales).
            for j in 0..32 {
                x[64 + j] = (j as f32 - 13.0) * 1e-9;
                x[96 + j] = (j as f32 - 7.0) * 1e7;
            }
            let s = Q8_1Acts::quantize(&x, 64, 256, Kernel::Scalar);
            let v = Q8_1Acts::quantize(&x, 64, 256, Kernel::Avx2);
            assert_eq!(s.qs, v.qs);
            assert_eq!(bits(s.d.as_flattened()), bits(v.d.as_flattened()));
            assert_eq!(bits(&s.s), bits(&v.s));
            // -14.5 and 14.5 (d = 1) round away from zero.
            let (lo, hi) = s.rows(0, 1).halves(0, 1);
            assert_eq!((lo[1], hi[14]), (-15, 15));
        }
    }

    /// Our f16 rounding (and F16C's) equals candle's (the `half` crate, through a tensor
    /// dtype conversion) on random and edge values.
    #[test]
    fn quant_f16_rounding_matches_candle() {
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            65504.0,
            65520.0,
            1e6,
            6.1e-5,
            6.0e-8,
            2.9e-8,
            3.0e-8,
            1e-9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            2049.0,
            2051.0,
            4095.0,
            0.1,
            1.0 / 127.0,
        ];
        for (i, v) in randn(5, 20000, 1.0).into_iter().enumerate() {
            // Spread over the normal, subnormal and overflowing ranges.
            vals.push(v * 2f32.powi((i % 60) as i32 - 35));
        }
        let want: Vec<f32> = Tensor::new(vals.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (v, w) in vals.iter().zip(&want) {
            assert_eq!(round_f16(*v).to_bits(), w.to_bits(), "{v:e}");
            #[cfg(target_arch = "x86_64")]
            if kernel() != Kernel::Scalar {
                // SAFETY: f16c was detected.
                let f = unsafe { x86::round_f16(*v) };
                assert_eq!(f.to_bits(), w.to_bits(), "F16C {v:e}");
            }
        }
        assert!(round_f16(f32::NAN).is_nan());
    }

    #[test]
    fn quant_round_half_away_matches_f32_round() {
        let mut v = -128.0f32;
        while v <= 128.0 {
            for x in [
                v,
                f32::from_bits(v.to_bits() + 1),
                f32::from_bits(v.to_bits().wrapping_sub(1)),
            ] {
                if x.abs() <= 128.0 {
                    assert_eq!(round_half_away(x), x.round() as i32, "{x}");
                }
            }
            v += 0.25;
        }
        for x in [0.49999997f32, -0.49999997, 126.5, -126.5, 0.5, -0.5] {
            assert_eq!(round_half_away(x), x.round() as i32, "{x}");
        }
    }
}
