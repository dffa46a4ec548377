//! cuDNN convolutions with everything but the launch done once per shape.
//!
//! candle's cuDNN path creates descriptors, asks cuDNN's heuristics for an algorithm and
//! allocates (and zeroes) a workspace on every call; measured on an H100 that made the SD 1.5
//! U-Net step 8× slower than candle's im2col path. Here descriptors and the algorithm cuDNN's
//! heuristics pick are kept per shape, and one workspace grows to the largest any plan needs. Accumulation is f32 for f16 data (cuDNN's "pseudo half"); f32
//! data may use TF32 tensor cores, as PyTorch allows cuDNN by default.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use cudarc::cudnn::{sys, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::f16;

/// Most workspace a plan may ask for (an algorithm wanting more is reported as an error).
const MAX_WORKSPACE: usize = 1 << 30;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ConvShape {
    device: DeviceId,
    dtype: DType,
    input: [usize; 4],
    filter: [usize; 4],
    stride: usize,
    padding: usize,
}

struct Plan<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

#[derive(Default)]
struct Plans {
    handles: HashMap<DeviceId, Arc<Cudnn>>,
    f16: HashMap<ConvShape, Arc<Plan<f16>>>,
    f32: HashMap<ConvShape, Arc<Plan<f32>>>,
    workspaces: HashMap<DeviceId, CudaSlice<u8>>,
}

// cuDNN handles and descriptors are neither Send nor Sync: one cache per thread (the worker
// runs every generation on one thread).
thread_local! {
    static PLANS: RefCell<Plans> = RefCell::new(Plans::default());
}

trait PlanCache: CudnnDataType + CudaDType + DeviceRepr + ValidAsZeroBits + Sized {
    fn plans(plans: &mut Plans) -> &mut HashMap<ConvShape, Arc<Plan<Self>>>;
    fn one() -> Self;
    fn zero() -> Self;
}

impl PlanCache for f16 {
    fn plans(plans: &mut Plans) -> &mut HashMap<ConvShape, Arc<Plan<Self>>> {
        &mut plans.f16
    }
    fn one() -> Self {
        f16::ONE
    }
    fn zero() -> Self {
        f16::ZERO
    }
}

impl PlanCache for f32 {
    fn plans(plans: &mut Plans) -> &mut HashMap<ConvShape, Arc<Plan<Self>>> {
        &mut plans.f32
    }
    fn one() -> Self {
        1.0
    }
    fn zero() -> Self {
        0.0
    }
}

fn wrap(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {e:?}"))
}

fn make_plan<T: PlanCache>(cudnn: &Arc<Cudnn>, shape: &ConvShape, out: [usize; 4]) -> Result<Plan<T>> {
    use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let dims = |d: [usize; 4]| d.map(|v| v as i32);
    let (p, s) = (shape.padding as i32, shape.stride as i32);
    let mut conv = cudnn
        .create_conv2d::<f32>([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
        .map_err(wrap)?;
    let x = cudnn.create_4d_tensor::<T>(CUDNN_TENSOR_NCHW, dims(shape.input)).map_err(wrap)?;
    let w = cudnn.create_4d_filter::<T>(CUDNN_TENSOR_NCHW, dims(shape.filter)).map_err(wrap)?;
    let y = cudnn.create_4d_tensor::<T>(CUDNN_TENSOR_NCHW, dims(out)).map_err(wrap)?;
    // f16: tensor cores with f32 accumulation. f32: cuDNN's default math, which lets Ampere and
    // later GPUs use TF32 (PyTorch's default for cuDNN convolutions too).
    let math = if shape.dtype == DType::F16 {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    };
    conv.set_math_type(math).map_err(wrap)?;
    let forward = ConvForward { conv: &conv, x: &x, w: &w, y: &y };
    let algo = forward.pick_algorithm().map_err(wrap)?;
    let workspace = forward.get_workspace_size(algo).map_err(wrap)?;
    if workspace > MAX_WORKSPACE {
        candle_core::bail!("cuDNN's convolution algorithm wants {workspace} bytes of workspace");
    }
    Ok(Plan { conv, x, w, y, algo, workspace })
}

struct CudnnConv2d {
    stride: usize,
    padding: usize,
}

impl CudnnConv2d {
    fn output_dims(&self, input: [usize; 4], filter: [usize; 4]) -> [usize; 4] {
        let out = |size: usize, k: usize| (size + 2 * self.padding - k) / self.stride + 1;
        [input[0], filter[0], out(input[2], filter[2]), out(input[3], filter[3])]
    }

    fn run<T: PlanCache>(&self, x: &CudaStorage, x_l: &Layout, w: &CudaStorage, w_l: &Layout) -> Result<CudaSlice<T>> {
        let dev: &CudaDevice = x.device();
        let (Some((x0, x1)), Some((w0, w1))) = (x_l.contiguous_offsets(), w_l.contiguous_offsets()) else {
            candle_core::bail!("cuDNN convolution takes contiguous inputs");
        };
        let input: [usize; 4] = x_l.shape().dims4()?.into();
        let filter: [usize; 4] = w_l.shape().dims4()?.into();
        let out_dims = self.output_dims(input, filter);
        let shape =
            ConvShape { device: dev.id(), dtype: x.dtype(), input, filter, stride: self.stride, padding: self.padding };
        let src = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let filter_data = w.as_cuda_slice::<T>()?.slice(w0..w1);
        // SAFETY: cuDNN writes every output element (beta = 0).
        let mut out = unsafe { dev.alloc::<T>(out_dims.iter().product())? };
        PLANS.with(|plans| -> Result<()> {
            let mut plans = plans.borrow_mut();
            let cudnn = match plans.handles.get(&shape.device) {
                Some(handle) => handle.clone(),
                None => {
                    let handle = Cudnn::new(dev.cuda_stream()).map_err(wrap)?;
                    plans.handles.insert(shape.device, handle.clone());
                    handle
                }
            };
            let plan = match T::plans(&mut plans).get(&shape) {
                Some(plan) => plan.clone(),
                None => {
                    let plan = Arc::new(make_plan::<T>(&cudnn, &shape, out_dims)?);
                    T::plans(&mut plans).insert(shape, plan.clone());
                    plan
                }
            };
            let too_small = plans.workspaces.get(&shape.device).is_none_or(|ws| ws.len() < plan.workspace);
            if too_small {
                plans.workspaces.remove(&shape.device);
                let ws = dev.alloc_zeros::<u8>(plan.workspace.max(1))?;
                plans.workspaces.insert(shape.device, ws);
            }
            let Some(workspace) = plans.workspaces.get_mut(&shape.device) else {
                candle_core::bail!("cuDNN workspace missing");
            };
            let forward = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
            // SAFETY: the descriptors were made for exactly these shapes and dtypes, the buffers
            // hold those element counts, and the workspace is at least the plan's size.
            unsafe { forward.launch(plan.algo, Some(workspace), (T::one(), T::zero()), &src, &filter_data, &mut out) }
                .map_err(wrap)
        })?;
        Ok(out)
    }
}

impl CustomOp2 for CudnnConv2d {
    fn name(&self) -> &'static str {
        "easel-cudnn-conv2d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("easel-cudnn-conv2d runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_l: &Layout, w: &CudaStorage, w_l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out_dims = self.output_dims(x_l.shape().dims4()?.into(), w_l.shape().dims4()?.into());
        let dev = x.device().clone();
        let storage = match x.dtype() {
            DType::F16 => CudaStorage::wrap_cuda_slice(self.run::<f16>(x, x_l, w, w_l)?, dev),
            DType::F32 => CudaStorage::wrap_cuda_slice(self.run::<f32>(x, x_l, w, w_l)?, dev),
            other => candle_core::bail!("cuDNN convolution: unsupported dtype {other:?}"),
        };
        Ok((storage, Shape::from(out_dims.to_vec())))
    }
}

pub(super) fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> Option<Result<Tensor>> {
    if !xs.device().is_cuda() || !matches!(xs.dtype(), DType::F16 | DType::F32) {
        return None;
    }
    if weight.dtype() != xs.dtype() || bias.dtype() != xs.dtype() || stride == 0 {
        return None;
    }
    let ((_, c_in, h, w), (c_out, w_in, kh, kw)) = (xs.dims4().ok()?, weight.dims4().ok()?);
    if c_in != w_in || h + 2 * padding < kh || w + 2 * padding < kw || bias.elem_count() != c_out {
        return None;
    }
    let op = CudnnConv2d { stride, padding };
    Some((|| {
        let out = xs.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op)?;
        out.broadcast_add(&bias.reshape((1, c_out, 1, 1))?)
    })())
}
