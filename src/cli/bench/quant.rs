//! `bsa bench quant`: our batched Q4_1 matmul against candle's `QMatMul`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use bsa::engine::quant::Q4_1Matrix;

/// Seconds per call of ours and of candle's `QMatMul` for `y = x W^T` with random Q4_1 weights
/// `[out, inp]`, for each batch size in `rows`: `(rows, ours_s, candle_s)`. Calls cycle through
/// enough copies of the matrix (64 MiB) that the weights come from memory, as in a model's
/// forward, not from cache. A benchmark to run by hand (release build), not a test.
pub fn bench(out: usize, inp: usize, rows: &[usize]) -> Vec<(usize, f64, f64)> {
    use candle_core::quantized::QMatMul;
    use candle_core::Module;
    use std::time::Instant;

    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.05, (out, inp), &dev).expect("random weights");
    let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
    let ours = Q4_1Matrix::from_qtensor(&q).expect("copy").expect("Q4_1");
    let copies = (64usize << 20).div_ceil(ours.size_bytes().max(1));
    let ours: Vec<Q4_1Matrix> = vec![ours; copies];
    let theirs: Vec<QMatMul> = (0..copies)
        .map(|_| {
            let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
            QMatMul::from_qtensor(q).expect("QMatMul")
        })
        .collect();
    // Each timing runs for at least this long, after one warm-up pass.
    let min_time = 0.3;
    let time = |f: &dyn Fn(usize)| {
        (0..copies).for_each(f);
        let t = Instant::now();
        let mut calls = 0usize;
        while t.elapsed().as_secs_f64() < min_time || calls < copies {
            f(calls % copies);
            calls += 1;
        }
        t.elapsed().as_secs_f64() / calls as f64
    };
    rows.iter()
        .map(|&n| {
            let x = Tensor::randn(0f32, 1.0, (n, inp), &dev).expect("random activations");
            let a = time(&|i| {
                ours[i].forward(&x).expect("ours");
            });
            let b = time(&|i| {
                theirs[i].forward(&x).expect("candle");
            });
            (n, a, b)
        })
        .collect()
}

