//! Which kernel this CPU runs, the dispatch of one tile to a format's kernels, and the SIMD
//! helpers the formats share.

use super::acts::TileRows;
use super::{BlockFormat, RowsOf};
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// AVX2 with FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// [`Kernel::Avx2`] plus AVX-VNNI: `vpdpbusd` forms the integer sums (the same exact
    /// values) in fewer instructions.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

/// The kernel for this process, fixed at first use.
pub(super) fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avxvnni") {
                return Kernel::Vnni;
            }
            return Kernel::Avx2;
        }
        Kernel::Scalar
    })
}

/// Every kernel this CPU can run, the portable one first (for tests comparing them).
#[cfg(test)]
pub(super) fn kernels_here() -> Vec<Kernel> {
    #[allow(unused_mut)] // nothing more off x86_64
    let mut ks = vec![Kernel::Scalar];
    #[cfg(target_arch = "x86_64")]
    match kernel() {
        Kernel::Vnni => ks.extend([Kernel::Avx2, Kernel::Vnni]),
        Kernel::Avx2 => ks.push(Kernel::Avx2),
        Kernel::Scalar => {}
    }
    if ks.len() < 3 {
        eprintln!("*** this CPU runs only {ks:?}: the other kernels go unchecked ***");
    }
    ks
}

/// Calls `$m::$f::<F, W, R>$args` for the tile `($nw, $nr)`: every tile shape
/// [`super::tile`] (and the tests) use.
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_tile {
    ($nw:expr, $nr:expr, $m:ident::$f:ident::<$F:ident>, $args:tt) => {
        dispatch_tile!(@shapes $nw, $nr, $m::$f, $F, $args,
            [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2), (3, 2), (4, 2),
             (1, 3), (2, 3), (1, 4), (2, 4)])
    };
    (@shapes $nw:expr, $nr:expr, $m:ident::$f:ident, $F:ident, $args:tt,
        [$(($w:literal, $r:literal)),*]) => {
        match ($nw, $nr) {
            $(($w, $r) => $m::$f::<$F, $w, $r> $args,)*
            (w, r) => unreachable!("tile of {w} x {r}"),
        }
    };
}

impl Kernel {
    /// `res[i * R + r] = <weight row i, activation row r>` for the `nw` weight rows of format
    /// `F` at the start of `w` (followed by at least `F::PAD` more bytes) and the R rows of
    /// `a`. Supported `(nw, R)`: `(1..=4, 1..=2)` and `(1..=2, 3..=4)`. Always inlined into
    /// the tile loop: a call per tile costs measurably on small tiles.
    #[inline(always)]
    pub(super) fn tile<F: BlockFormat>(
        self,
        w: &[u8],
        nw: usize,
        a: RowsOf<'_, F>,
        res: &mut [f32],
    ) {
        let nr = a.row_count();
        let row_bytes = F::row_bytes(a.blocks());
        assert!(w.len() >= nw * row_bytes + F::PAD && res.len() == nw * nr);
        match self {
            Kernel::Scalar => {
                let rows = w[..nw * row_bytes].chunks_exact(row_bytes.max(1));
                for (wrow, res) in rows.zip(res.chunks_exact_mut(nr)) {
                    match nr {
                        1 => F::dot_portable::<1>(wrow, a, res),
                        2 => F::dot_portable::<2>(wrow, a, res),
                        3 => F::dot_portable::<3>(wrow, a, res),
                        4 => F::dot_portable::<4>(wrow, a, res),
                        _ => unreachable!("tile of {nr} rows"),
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx2` is only chosen after detecting avx2, fma and f16c; the
            // lengths the kernels rely on were checked above (`a` holds `nr` rows by
            // construction).
            Kernel::Avx2 => unsafe { dispatch_tile!(nw, nr, x86::tile_avx2::<F>, (w, a, res)) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, and `Kernel::Vnni` also needs avxvnni, detected likewise.
            Kernel::Vnni => unsafe { dispatch_tile!(nw, nr, x86::tile_vnni::<F>, (w, a, res)) },
        }
    }
}

/// The kernels' fixed horizontal sum of 8 lanes: `((v4 + v0) + (v6 + v2)) + ((v5 + v1) +
/// (v7 + v3))`, the order of AVX's extract-high-half, movehl and movehdup reduction.
pub(super) fn hsum8(v: [f32; 8]) -> f32 {
    ((v[4] + v[0]) + (v[6] + v[2])) + ((v[5] + v[1]) + (v[7] + v[3]))
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::super::{BlockFormat, RowsOf};
    use std::arch::x86_64::*;

    /// How far ahead of the weights being read to prefetch, in bytes. The hardware prefetcher
    /// alone leaves single-row matmuls (decode) well short of memory bandwidth on cold weights;
    /// 256 took ~20-35% off them (Q4_1 1536x576: 40 -> 32 us), with no change for 4-row tiles.
    pub(in super::super) const PREFETCH: usize = 256;

    /// An entry point `$name` compiling [`BlockFormat::tile_x86`] with the target features
    /// `$features`, `VNNI = $vnni`.
    macro_rules! entry_point {
        ($name:ident, $features:literal, $vnni:literal, $what:literal) => {
            #[doc = concat!("[`BlockFormat::tile_x86`] of `F` ", $what, ".")]
            ///
            /// # Safety
            /// As [`BlockFormat::tile_x86`], with `VNNI` as this entry point sets it.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<F: BlockFormat, const W: usize, const R: usize>(
                w: &[u8],
                a: RowsOf<'_, F>,
                res: &mut [f32],
            ) {
                F::tile_x86::<W, R, $vnni>(w, a, res)
            }
        };
    }

    entry_point!(tile_avx2, "avx2,fma,f16c", false, "on AVX2");
    entry_point!(tile_vnni, "avx2,fma,f16c,avxvnni", true, "with AVX-VNNI");

    /// [`super::hsum8`] on a vector.
    ///
    /// # Safety
    /// The CPU must support avx.
    #[inline(always)]
    pub(in super::super) unsafe fn hsum8(v: __m256) -> f32 {
        let v = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
    }
}
