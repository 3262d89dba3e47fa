//! Data and checks shared by the kernel tests of every format.

use super::acts::Activations;
use super::kernel::Kernel;
use super::{tile_span, BlockFormat, QuantMatrix, QK};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

pub const BATCHES: [usize; 7] = [1, 2, 3, 4, 5, 8, 17];
/// in_features not a multiple of 256 (but of 32), with 3, 19 and 49 blocks so that short
/// last groups of every length are covered; out_features not a multiple of the task size.
pub const SHAPES: [(usize, usize); 3] = [(50, 96), (37, 608), (70, 1568)];

pub type Matrix<T> = Vec<Vec<T>>;

/// `w` quantized to `F`'s dtype: ours, candle's and its dequantized f32 values.
pub fn quantized<F: BlockFormat>(w: &Tensor) -> (QuantMatrix<F>, QTensor, Tensor) {
    let q = QTensor::quantize(w, F::DTYPE).unwrap();
    let ours = QuantMatrix::<F>::from_qtensor(&q).unwrap().unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap();
    (ours, q, deq)
}

/// Deterministic normal samples.
pub fn randn(seed: u64, len: usize, std: f32) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let d = rand_distr::Normal::new(0f32, std).unwrap();
    (0..len).map(|_| d.sample(&mut rng)).collect()
}

/// Activations with a spread of magnitudes across blocks, as hidden states have.
pub fn acts(n: usize, inp: usize) -> Tensor {
    let seed = (n * 7919 + inp) as u64;
    let scale = randn(seed + 1, n * inp / QK, 1.0);
    let v: Vec<f32> = randn(seed, n * inp, 1.0)
        .iter()
        .enumerate()
        .map(|(i, v)| v * scale[i / QK].exp())
        .collect();
    Tensor::from_vec(v, (n, inp), &Device::Cpu).unwrap()
}

pub fn rows(t: &Tensor) -> Matrix<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Per 32-block of an activation row `x` and a weight row `w`: the block's `max |x|`, `Σ |w|`
/// and `Σ |x w|`, what the int8 activation error bounds are made of.
pub fn block_terms<'a>(x: &'a [f32], w: &'a [f32]) -> impl Iterator<Item = (f32, f32, f32)> + 'a {
    x.chunks_exact(QK).zip(w.chunks_exact(QK)).map(|(xs, ws)| {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let wabs: f32 = ws.iter().map(|w| w.abs()).sum();
        let xw: f32 = xs.iter().zip(ws).map(|(x, w)| (x * w).abs()).sum();
        (amax, wabs, xw)
    })
}

/// `[n, out]` from `dot(o, wn, r0, rt, res)` calls, single-threaded, with tiles other than
/// `matmul`'s: activation tiles of 3, 1, 4, 2, ... rows, against 3, 4, 2 and 2 weight rows
/// (fewer at the ends), so every tile shape the kernels take gets used.
fn run_tiles(
    out: usize,
    n: usize,
    dot: impl Fn(usize, usize, usize, usize, &mut [f32]),
) -> Matrix<f32> {
    let mut y = vec![vec![0f32; out]; n];
    let (mut r0, mut step) = (0, 0);
    while r0 < n {
        let rt = [3, 1, 4, 2][step % 4].min(n - r0);
        let wt = [3, 4, 2, 2][rt - 1];
        tile_span(0..out, r0, rt, wt, &dot, |r, o, v| y[r][o] = v);
        r0 += rt;
        step += 1;
    }
    y
}

/// `x W^T` with the given kernel forced ([`run_tiles`]).
pub fn run<F: BlockFormat>(m: &QuantMatrix<F>, x: &Tensor, k: Kernel) -> Matrix<f32> {
    let (n, inp) = x.dims2().unwrap();
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let acts = F::Acts::quantize(&xv, n, inp, k);
    let row_bytes = m.row_bytes();
    run_tiles(m.out_features, n, |o, wn, r0, rt, res| {
        k.tile::<F>(&m.data[o * row_bytes..], wn, acts.rows(r0, rt), res)
    })
}

/// `x W^T` through the public (parallel, row-grouping) forward, after checking that each row
/// is bitwise the row computed alone through it, and the row each of `kernels` gives
/// ([`run`]).
pub fn forward_batch_independent<F: BlockFormat>(
    m: &QuantMatrix<F>,
    x: &Tensor,
    kernels: &[Kernel],
) -> Matrix<f32> {
    let (n, inp) = x.dims2().unwrap();
    let out = m.out_features;
    let batch = rows(&m.forward(x).unwrap());
    let by_kernel: Vec<_> = kernels.iter().map(|&k| run(m, x, k)).collect();
    for r in 0..n {
        let alone = rows(&m.forward(&x.narrow(0, r, 1).unwrap()).unwrap());
        assert_eq!(
            bits(&batch[r]),
            bits(&alone[0]),
            "shape {out}x{inp} n {n} row {r}"
        );
        for (k, ys) in kernels.iter().zip(&by_kernel) {
            assert_eq!(
                bits(&ys[r]),
                bits(&batch[r]),
                "{k:?} shape {out}x{inp} n {n} row {r}"
            );
        }
    }
    batch
}

/// `from_qtensor` takes `F`'s dtype, with the tensor's shape, and none of `others`.
pub fn assert_only_takes<F: BlockFormat>(others: [GgmlDType; 3]) {
    let t = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu).unwrap();
    for dt in others {
        let q = QTensor::quantize(&t, dt).unwrap();
        assert!(
            QuantMatrix::<F>::from_qtensor(&q).unwrap().is_none(),
            "{dt:?}"
        );
    }
    let q = QTensor::quantize(&t, F::DTYPE).unwrap();
    let m = QuantMatrix::<F>::from_qtensor(&q).unwrap().unwrap();
    assert_eq!((m.out_features(), m.in_features()), (8, 64));
}
