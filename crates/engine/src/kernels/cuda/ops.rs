//! The fused kernels of `easel.cu` as candle custom ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;

/// Head dims (rounded up to 16) the flash-attention kernel is instantiated for.
const FLASH_HEAD_DIMS: [usize; 7] = [32, 48, 64, 80, 96, 128, 160];

/// Launches kernel `$name` of easel.cu with the given arguments (by reference, in order).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func(&$name, "easel", ptx::EASEL)?;
        let mut builder = func.builder();
        $(builder.arg($arg);)+
        // SAFETY: each call's argument list matches its kernel's signature in easel.cu, and every
        // buffer it passes holds the element counts the kernel indexes.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

/// The contiguous slice of a tensor's storage that its layout covers.
fn contiguous<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("easel cuda kernels take contiguous inputs");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

fn on_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} is a CUDA kernel; the CPU has its own")
}

fn grid(x: usize, y: usize) -> (u32, u32, u32) {
    (x.clamp(1, 65_535) as u32, y.clamp(1, 65_535) as u32, 1)
}

fn is_cuda_f16_or_f32(t: &Tensor) -> bool {
    t.device().is_cuda() && matches!(t.dtype(), DType::F16 | DType::F32)
}

// ---- attention --------------------------------------------------------------------------------

struct FlashAttention {
    scale: f32,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "easel-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        on_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, n_q, d) = q_l.shape().dims3()?;
        let n_k = k_l.shape().dims3()?.1;
        let padded = d.div_ceil(16) * 16;
        let dev = q.device().clone();
        let (q, k, v) = (contiguous::<f16>(q, q_l)?, contiguous::<f16>(k, k_l)?, contiguous::<f16>(v, v_l)?);
        // SAFETY: every element is written by the kernel (rows < n_q, columns < d).
        let out = unsafe { dev.alloc::<f16>(batch * n_q * d)? };
        let cfg = LaunchConfig {
            grid_dim: (n_q.div_ceil(64) as u32, batch as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_q_i, n_k_i, d_i) = (n_q as i32, n_k as i32, d as i32);
        launch!(
            dev,
            format!("flash_attention_f16_d{padded}"),
            cfg,
            &q,
            &k,
            &v,
            &out,
            &n_q_i,
            &n_k_i,
            &d_i,
            &self.scale
        );
        Ok((CudaStorage::wrap_cuda_slice(out, dev), q_l.shape().clone()))
    }
}

pub(super) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Option<Result<Tensor>> {
    if !q.device().is_cuda() || q.dtype() != DType::F16 {
        return None;
    }
    let (Ok((batch, _, d)), Ok((kb, n_k, kd)), Ok(v_dims)) = (q.dims3(), k.dims3(), v.dims3()) else {
        return None;
    };
    let padded = d.div_ceil(16) * 16;
    if (kb, kd) != (batch, d)
        || v_dims != (batch, n_k, d)
        || n_k == 0
        || d % 2 != 0
        || !FLASH_HEAD_DIMS.contains(&padded)
    {
        return None;
    }
    if k.dtype() != DType::F16 || v.dtype() != DType::F16 || batch > 65_535 {
        return None;
    }
    // The kernel reads element pairs as 32-bit words: each tensor must start on an even element.
    let aligned = |t: &Tensor| -> Result<Tensor> {
        let t = t.contiguous()?;
        let even = t.layout().start_offset() % 2 == 0;
        if even {
            Ok(t)
        } else {
            t.copy()
        }
    };
    Some((|| aligned(q)?.apply_op3_no_bwd(&aligned(k)?, &aligned(v)?, &FlashAttention { scale: scale as f32 }))())
}

// ---- group norm -------------------------------------------------------------------------------

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNorm {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        suffix: &str,
        x: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
    ) -> Result<CudaSlice<T>> {
        let (b, c, h, w) = x.1.shape().dims4()?;
        let hw = h * w;
        let dev = x.0.device().clone();
        let (xs, weight, bias) =
            (contiguous::<T>(x.0, x.1)?, contiguous::<T>(weight.0, weight.1)?, contiguous::<T>(bias.0, bias.1)?);
        let groups = self.groups;
        let group_elems = c / groups * hw;
        let stats = dev.alloc_zeros::<f64>(2 * b * groups)?;
        // Each block sums a chunk of one group: enough blocks to fill the GPU for a VAE group of
        // a million values, few atomics for a U-Net group of ten thousand.
        let chunk = 8192usize;
        let cfg = LaunchConfig {
            grid_dim: grid(group_elems.div_ceil(chunk), b * groups),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (group_elems_i, chunk_i) = (group_elems as i32, chunk as i32);
        launch!(dev, format!("group_norm_stats_{suffix}"), cfg, &xs, &stats, &group_elems_i, &chunk_i);
        // SAFETY: the apply kernel writes every element.
        let out = unsafe { dev.alloc::<T>(b * c * hw)? };
        let rows = b * c;
        let cfg = LaunchConfig {
            grid_dim: grid(hw.div_ceil(THREADS as usize).min(64), rows),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (c_i, groups_i, hw_i, rows_i, silu_i) =
            (c as i32, groups as i32, hw as i32, rows as i32, i32::from(self.silu));
        launch!(
            dev,
            format!("group_norm_apply_{suffix}"),
            cfg,
            &xs,
            &stats,
            &weight,
            &bias,
            &out,
            &c_i,
            &groups_i,
            &hw_i,
            &rows_i,
            &self.eps,
            &silu_i
        );
        Ok(out)
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "easel-cuda-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        on_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_l: &Layout,
        w: &CudaStorage,
        w_l: &Layout,
        b: &CudaStorage,
        b_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let storage = match x.dtype() {
            DType::F32 => CudaStorage::wrap_cuda_slice(self.run::<f32>("f32", (x, x_l), (w, w_l), (b, b_l))?, dev),
            DType::F16 => CudaStorage::wrap_cuda_slice(self.run::<f16>("f16", (x, x_l), (w, w_l), (b, b_l))?, dev),
            other => candle_core::bail!("easel cuda group norm: unsupported dtype {other:?}"),
        };
        Ok((storage, x_l.shape().clone()))
    }
}

pub(super) fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Option<Result<Tensor>> {
    if !is_cuda_f16_or_f32(xs) || weight.dtype() != xs.dtype() || bias.dtype() != xs.dtype() {
        return None;
    }
    let (b, c, h, w) = xs.dims4().ok()?;
    if groups == 0 || c % groups != 0 || weight.elem_count() != c || bias.elem_count() != c || h * w > i32::MAX as usize
    {
        return None;
    }
    if b * groups > 65_535 || c / groups * h * w > i32::MAX as usize {
        return None;
    }
    let op = GroupNorm { groups, eps: eps as f32, silu };
    Some((|| xs.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op))())
}

// ---- GEGLU ------------------------------------------------------------------------------------

struct Geglu;

impl Geglu {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
        &self,
        suffix: &str,
        x: &CudaStorage,
        l: &Layout,
    ) -> Result<CudaSlice<T>> {
        let dims = l.shape().dims();
        let inner = dims[dims.len() - 1] / 2;
        let rows = l.shape().elem_count() / (2 * inner);
        let dev = x.device().clone();
        let xs = contiguous::<T>(x, l)?;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(rows * inner)? };
        let cfg = LaunchConfig {
            grid_dim: grid(inner.div_ceil(THREADS as usize), rows),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, inner_i) = (rows as i32, inner as i32);
        launch!(dev, format!("geglu_{suffix}"), cfg, &xs, &out, &rows_i, &inner_i);
        Ok(out)
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "easel-cuda-geglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        on_cpu(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let storage = match x.dtype() {
            DType::F32 => CudaStorage::wrap_cuda_slice(self.run::<f32>("f32", x, l)?, dev),
            DType::F16 => CudaStorage::wrap_cuda_slice(self.run::<f16>("f16", x, l)?, dev),
            other => candle_core::bail!("easel cuda geglu: unsupported dtype {other:?}"),
        };
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        Ok((storage, Shape::from(dims)))
    }
}

pub(super) fn geglu(projected: &Tensor) -> Option<Result<Tensor>> {
    if !is_cuda_f16_or_f32(projected) {
        return None;
    }
    let last = *projected.dims().last()?;
    let rows = projected.elem_count() / last.max(1);
    if last % 2 != 0 || last == 0 || rows > i32::MAX as usize || last > i32::MAX as usize {
        return None;
    }
    Some((|| projected.contiguous()?.apply_op1_no_bwd(&Geglu))())
}
