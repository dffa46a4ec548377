//! The CUDA kernels against candle's composed operations (or the CPU), on the first GPU, called
//! past the `EASEL_CUDA_KERNELS` switch. Built with the `cuda` feature; each test passes without
//! doing anything when no GPU is present, so the feature's test binary can be built anywhere and
//! run where a GPU is (`cargo test --release --features cudnn -p easel-engine cuda_`).

use candle_core::{DType, Device, Module, Tensor, D};

use crate::kernels::test_values;

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            eprintln!("no CUDA device, skipped: {e}");
            None
        }
    }
}

fn values(shape: &[usize], seed: u32, scale: f32, dev: &Device, dtype: DType) -> Tensor {
    let len = shape.iter().product();
    let v: Vec<f32> = test_values(len, seed).into_iter().map(|x| x * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_device(dev).unwrap()
}

/// Largest absolute difference, computed in f32 on the CPU.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let f = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    f(a).iter().zip(f(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let [q, k, v] = [q, k, v].map(|t| t.to_dtype(DType::F32).unwrap());
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap()
}

#[test]
fn cuda_flash_attention_matches_softmax_of_the_scores() {
    let Some(dev) = gpu() else { return };
    // Head dims of SD 1.x (40, 80, 160) and SDXL/SD 2 (64); query and key counts that leave
    // partial tiles; 77 keys as in cross-attention.
    for (batch, n_q, n_k, d) in
        [(3, 100, 77, 40), (2, 130, 130, 64), (1, 64, 300, 80), (2, 17, 5, 160), (1, 1000, 1000, 64)]
    {
        let q = values(&[batch, n_q, d], 1, 2.0, &dev, DType::F16);
        let k = values(&[batch, n_k, d], 2, 2.0, &dev, DType::F16);
        let v = values(&[batch, n_k, d], 3, 1.0, &dev, DType::F16);
        let scale = 1.0 / (d as f64).sqrt();
        let out = super::ops::attention(&q, &k, &v, scale).expect("applies to f16 on CUDA").unwrap();
        assert_eq!(out.dims(), &[batch, n_q, d]);
        let diff = max_diff(&out, &reference_attention(&q, &k, &v, scale));
        // f16 probabilities and output: a few units of f16 rounding at |v| ≤ 1.
        assert!(diff < 4e-3, "({batch}, {n_q}, {n_k}, {d}): max difference {diff}");
    }
}

#[test]
fn cuda_flash_attention_declines_what_it_cannot_do() {
    let Some(dev) = gpu() else { return };
    let f16 = |shape: &[usize]| values(shape, 1, 1.0, &dev, DType::F16);
    // odd head dim, too large a head dim, f32
    assert!(super::ops::attention(&f16(&[1, 8, 41]), &f16(&[1, 8, 41]), &f16(&[1, 8, 41]), 1.0).is_none());
    assert!(super::ops::attention(&f16(&[1, 8, 512]), &f16(&[1, 8, 512]), &f16(&[1, 8, 512]), 1.0).is_none());
    let f32 = values(&[1, 8, 64], 1, 1.0, &dev, DType::F32);
    assert!(super::ops::attention(&f32, &f32, &f32, 1.0).is_none());
}

#[test]
fn cuda_group_norm_matches_candle() {
    let Some(dev) = gpu() else { return };
    // A U-Net-like shape, and one whose groups span several blocks of the statistics kernel.
    for (dims, groups) in [([2, 64, 9, 7], 32), ([1, 128, 96, 80], 32)] {
        for dtype in [DType::F32, DType::F16] {
            let c = dims[1];
            let x = (values(&dims, 4, 3.0, &dev, dtype) + 0.5).unwrap();
            let weight = values(&[c], 5, 1.0, &dev, dtype);
            let bias = values(&[c], 6, 1.0, &dev, dtype);
            let reference = candle_nn::GroupNorm::new(
                weight.to_dtype(DType::F32).unwrap(),
                bias.to_dtype(DType::F32).unwrap(),
                c,
                groups,
                1e-6,
            )
            .unwrap()
            .forward(&x.to_dtype(DType::F32).unwrap())
            .unwrap();
            let tolerance = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
            for silu in [false, true] {
                let out = super::ops::group_norm(&x, &weight, &bias, groups, 1e-6, silu).expect("applies").unwrap();
                assert_eq!(out.dtype(), dtype);
                let expected = if silu { candle_nn::ops::silu(&reference).unwrap() } else { reference.clone() };
                let diff = max_diff(&out, &expected);
                assert!(diff < tolerance, "{dims:?} {dtype:?} silu {silu}: max difference {diff}");
            }
        }
    }
}

#[test]
fn cuda_geglu_matches_chunk_and_gelu() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::F32, DType::F16] {
        let x = values(&[2, 37, 2 * 300], 7, 3.0, &dev, dtype);
        let out = super::ops::geglu(&x).expect("applies").unwrap();
        let x32 = x.to_dtype(DType::F32).unwrap();
        let halves = x32.chunk(2, D::Minus1).unwrap();
        let expected = (&halves[0] * halves[1].gelu_erf().unwrap()).unwrap();
        let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let diff = max_diff(&out, &expected);
        assert_eq!(out.dims(), &[2, 37, 300]);
        assert!(diff < tolerance, "{dtype:?}: max difference {diff}");
    }
}

#[cfg(feature = "cudnn")]
#[test]
fn cuda_cudnn_convolutions_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    // 3×3 same-size, 3×3 stride 2 (the U-Net's and VAE's downsamplers), 1×1; each twice, so the
    // second call runs on the cached plan.
    for (input, out_ch, kernel, stride, padding) in
        [([2, 16, 20, 24], 32, 3, 1, 1), ([1, 32, 17, 16], 32, 3, 2, 1), ([2, 40, 8, 8], 24, 1, 1, 0)]
    {
        for dtype in [DType::F32, DType::F16] {
            let c = input[1];
            let x = values(&input, 8, 1.0, &dev, dtype);
            let w = values(&[out_ch, c, kernel, kernel], 9, 0.2, &dev, dtype);
            let b = values(&[out_ch], 10, 1.0, &dev, dtype);
            let cpu = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
            let expected = cpu(&x)
                .conv2d(&cpu(&w), padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&cpu(&b).reshape((1, out_ch, 1, 1)).unwrap())
                .unwrap();
            // TF32 (10-bit mantissa) products for f32, f16 output for f16, over up to 360 terms.
            let tolerance = if dtype == DType::F32 { 2e-2 } else { 3e-2 };
            for _ in 0..2 {
                let out = super::cudnn_conv::conv2d(&x, &w, &b, stride, padding).expect("applies").unwrap();
                assert_eq!(out.dtype(), dtype);
                let diff = max_diff(&out, &expected);
                assert!(diff < tolerance, "{input:?} k{kernel} s{stride} {dtype:?}: max difference {diff}");
            }
        }
    }
}
