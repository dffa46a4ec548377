//! Throughput of the GEMM and convolution kernels on shapes from the SD 1.5 U-Net, in GFLOP/s.
//! `cargo run --release -p easel-engine --example kernel_bench`
use std::time::Instant;

use candle_core::{Device, Module, Tensor};

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let runs = 5;
    let start = Instant::now();
    for _ in 0..runs {
        f();
    }
    start.elapsed().as_secs_f64() / runs as f64
}

/// A layer's `VarBuilder`: `weight` and a zero bias of `outputs`, stored and requested in `dtype`.
fn layer_weights(
    weight: &Tensor,
    outputs: usize,
    dtype: candle_core::DType,
) -> candle_core::Result<candle_nn::VarBuilder<'static>> {
    let tensors = [
        ("weight".to_string(), weight.to_dtype(dtype)?),
        ("bias".to_string(), Tensor::zeros(outputs, dtype, weight.device())?),
    ];
    Ok(candle_nn::VarBuilder::from_tensors(tensors.into_iter().collect(), dtype, weight.device()))
}

/// The weight dtypes to measure: f32, f16 when `with_f16`, and bf16 where the CPU has the bf16 mode.
fn weight_dtypes(with_f16: bool) -> Vec<candle_core::DType> {
    use candle_core::DType;
    let mut dtypes = vec![DType::F32];
    if with_f16 {
        dtypes.push(DType::F16);
    }
    if easel_engine::kernels::bf16_supported() {
        dtypes.push(DType::BF16);
    }
    dtypes
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [(320, 2880, 4096), (1280, 11520, 256), (4096, 320, 320), (640, 5760, 1024)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (k, n), &dev)?;
        let dt = time(|| {
            a.matmul(&b).unwrap();
        });
        println!("matmul {m}x{k}x{n}: {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
    }
    // Every 3×3 stride-1 convolution shape of the SD 1.5 U-Net at 512×512 with CFG (batch 2):
    // (c_in, c_out, side). Set EASEL_BENCH_CONV=all for all of them; the default is the first.
    let all = std::env::var("EASEL_BENCH_CONV").is_ok_and(|v| v == "all");
    let shapes: &[(usize, usize, usize)] = &[
        (320, 320, 64),
        (640, 640, 64),
        (640, 640, 32),
        (1280, 1280, 32),
        (1280, 1280, 16),
        (2560, 1280, 16),
        (1280, 1280, 8),
        (2560, 1280, 8),
    ];
    for &(c_in, c_out, side) in if all { shapes } else { &shapes[..1] } {
        let x = Tensor::randn(0f32, 1.0, (2, c_in, side, side), &dev)?;
        let weight = Tensor::randn(0f32, 0.02, (c_out, c_in, 3, 3), &dev)?;
        // F16: weights kept as an f16 checkpoint stores them, widened in the weight transform.
        for dtype in weight_dtypes(true) {
            let vb = layer_weights(&weight, c_out, dtype)?;
            let conv = easel_engine::models::nn::conv2d(c_in, c_out, 3, 1, 1, vb)?;
            let dt = time(|| {
                conv.forward(&x).unwrap();
            });
            println!(
                "conv 2x{c_in}x{side}x{side} -> {c_out} 3x3 ({dtype:?} weights): {:.1} ms, {:.1} GFLOP/s (direct-equivalent)",
                dt * 1e3,
                2.0 * 2.0 * (c_in * c_out * 9 * side * side) as f64 / dt / 1e9
            );
        }
    }

    // The U-Net's 1×1 shortcut convolutions and stride-2 downsamplers at the lowest levels.
    let others: &[(usize, usize, usize, usize, usize)] =
        &[(2560, 1280, 8, 1, 1), (2560, 1280, 16, 1, 1), (1280, 1280, 16, 3, 2), (640, 640, 32, 3, 2)];
    for &(c_in, c_out, side, k, stride) in if all { others } else { &[] } {
        let x = Tensor::randn(0f32, 1.0, (2, c_in, side, side), &dev)?;
        let weight = Tensor::randn(0f32, 0.02, (c_out, c_in, k, k), &dev)?;
        for dtype in weight_dtypes(false) {
            let vb = layer_weights(&weight, c_out, dtype)?;
            let conv = easel_engine::models::nn::conv2d(c_in, c_out, k, stride, k / 2, vb)?;
            let dt = time(|| {
                conv.forward(&x).unwrap();
            });
            println!(
                "conv 2x{c_in}x{side}x{side} -> {c_out} {k}x{k} stride {stride} ({dtype:?} weights): {:.1} ms",
                dt * 1e3
            );
        }
    }

    // Linear layers of the U-Net's transformer blocks at 512×512 with CFG (rows = 2 × tokens):
    // f32 weights, f16 ones kept as stored and widened per call, and the bf16 mode's.
    // Then the text encoders' (2 × 77 tokens; CLIP ViT-L and OpenCLIP bigG) and the U-Net's
    // cross-attention keys and values over the context.
    for (rows, in_dim, out_dim) in [
        (8192, 320, 2560),
        (2048, 640, 5120),
        (512, 1280, 10240),
        (512, 5120, 1280),
        (128, 1280, 1280),
        (154, 768, 768),
        (154, 768, 3072),
        (154, 3072, 768),
        (154, 1280, 5120),
        (154, 5120, 1280),
        (154, 768, 320),
    ] {
        let x = Tensor::randn(0f32, 1.0, (2, rows / 2, in_dim), &dev)?;
        let weight = Tensor::randn(0f32, 0.02, (out_dim, in_dim), &dev)?;
        for dtype in weight_dtypes(true) {
            let vb = layer_weights(&weight, out_dim, dtype)?;
            if dtype == candle_core::DType::F32 {
                // candle-nn's own linear layer on the same weights, for comparison.
                let candle = candle_nn::Linear::new(weight.clone(), Some(Tensor::zeros(out_dim, dtype, &dev)?));
                let dt = time(|| {
                    candle.forward(&x).unwrap();
                });
                println!("linear {rows}x{in_dim} -> {out_dim} (candle-nn): {:.1} ms", dt * 1e3);
            }
            let linear = easel_engine::models::nn::linear(in_dim, out_dim, vb)?;
            let dt = time(|| {
                linear.forward(&x).unwrap();
            });
            println!(
                "linear {rows}x{in_dim} -> {out_dim} ({dtype:?} weights): {:.1} ms, {:.1} GFLOP/s",
                dt * 1e3,
                2.0 * (rows * in_dim * out_dim) as f64 / dt / 1e9
            );
        }
    }

    // Self-attention at the U-Net's highest resolution for a 512×512 image with CFG:
    // batch 2 × 8 heads, 4096 tokens, 40 channels per head.
    let q = Tensor::randn(0f32, 1.0, (16, 4096, 40), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (16, 4096, 40), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (16, 4096, 40), &dev)?;
    for bf16 in [false, true] {
        if bf16 && !easel_engine::kernels::bf16_supported() {
            continue;
        }
        let dt = time(|| {
            easel_engine::models::attention::scaled_dot_product_attention(&q, &k, &v, 40f64.powf(-0.5), bf16).unwrap();
        });
        println!("self-attention 16x4096x40{}: {:.1} ms", if bf16 { " (bf16)" } else { "" }, dt * 1e3);
    }

    #[cfg(target_arch = "x86_64")]
    if easel_engine::kernels::bf16::supported() {
        use easel_engine::kernels::bf16::{gemm, pairs_from_f32, Panels};
        for (m, k, n) in [(320, 2880, 4096), (1280, 11520, 256), (640, 5760, 1024)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut a_pairs = Vec::new();
            pairs_from_f32(&a, m, k, k, &mut a_pairs);
            let mut panels = Panels { data: Vec::new(), n: 0, k_pairs: 0 };
            let mut c = vec![0f32; m * n];
            let dt = time(|| {
                Panels::from_f32(&b, k, n, n, &mut panels);
                unsafe { gemm(m, &a_pairs, k / 2, &panels, c.as_mut_ptr(), n, true) };
            });
            println!("bf16 matmul {m}x{k}x{n} (packing included): {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
        }
    }
    Ok(())
}
