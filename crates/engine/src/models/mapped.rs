//! Convolution and linear weights read straight from the memory-mapped checkpoint.
//!
//! candle's CPU tensors own their memory, so a weight loaded through a `VarBuilder` is copied
//! out of the file mapping into freshly allocated memory. For SD 1.5 in f32 that is 4.3 GB of
//! new pages the kernel must zero and a copy into them: in `perf` of a load, 51% of the time
//! zeroing pages and 12% copying. Easel's own CPU kernels take a weight as a plain slice, so on
//! the CPU the layers that use them (convolutions and linear layers, which hold nearly all of a
//! model's weights) keep a view into the mapping instead: loading does no copy, a background
//! thread reads the pages in file order (from disk if the page cache lost them), and several
//! processes (or a reload) share them. Biases, norms and embeddings (small) are still copied.
//!
//! The catch of every mapped design (llama.cpp's, safetensors' own): a model file changed in
//! place while it is loaded changes under the model. Downloads are written beside the file and
//! renamed, which leaves a mapping intact.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::checkpoint::Checkpoint;
use crate::kernels::contiguous_f32;
use crate::kernels::conv2d::conv2d_forward;
use crate::kernels::half_weights::{linear_forward, WeightData};

thread_local! {
    /// The checkpoint whose model is being built on this thread (see [`ModelWeights::build`]).
    /// A thread-local because candle's `VarBuilder` hides its backend behind a trait object:
    /// the layer constructors cannot ask it for anything but copied tensors.
    static BUILDING: RefCell<Option<Arc<Checkpoint>>> = const { RefCell::new(None) };
    /// Bytes of weights this thread's loads have left in place so far; a load reports the
    /// difference (models are built on the thread that loads them).
    static IN_PLACE_BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Bytes of weights left in place by the loads this thread has done so far.
pub(crate) fn in_place_bytes_on_this_thread() -> u64 {
    IN_PLACE_BYTES.get()
}

/// Page-in threads still running (see [`ModelWeights::build`]).
static PAGING_IN: AtomicUsize = AtomicUsize::new(0);

/// Counts a page-in thread as finished, also if it unwinds.
struct PageInDone;

impl Drop for PageInDone {
    fn drop(&mut self) {
        PAGING_IN.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits until every model loaded so far has its weights paged in: for benchmarks, whose
/// timings should not include a load's disk reads running beside them.
pub fn wait_for_page_in() {
    while PAGING_IN.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A component's weights: the `VarBuilder` its constructor takes, plus the mapped checkpoint
/// behind it for the layers that can read their weights in place.
pub struct ModelWeights {
    vb: VarBuilder<'static>,
    checkpoint: Arc<Checkpoint>,
}

impl ModelWeights {
    pub fn new(checkpoint: Checkpoint, dtype: DType, device: &candle_core::Device) -> Self {
        let checkpoint = Arc::new(checkpoint);
        let backend = super::checkpoint::RenamingBackend(checkpoint.clone());
        Self { vb: VarBuilder::from_backend(Box::new(backend), dtype, device.clone()), checkpoint }
    }

    /// Runs a model constructor on these weights; with `map`, its CPU convolutions and linear
    /// layers keep views into the mapping (see the module docs) instead of copies.
    pub fn build<T>(self, map: bool, build: impl FnOnce(VarBuilder<'static>) -> Result<T>) -> Result<T> {
        self.build_with_pages(map, build).map(|(model, _)| model)
    }

    /// [`Self::build`], also returning the pages the model reads in place, for the pipeline to
    /// release while the model is idle.
    pub fn build_with_pages<T>(
        self,
        map: bool,
        build: impl FnOnce(VarBuilder<'static>) -> Result<T>,
    ) -> Result<(T, MappedPages)> {
        if !map {
            return Ok((build(self.vb)?, MappedPages::default()));
        }
        /// Restores the outer value, also when `build` unwinds.
        struct Restore(Option<Arc<Checkpoint>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                BUILDING.with_borrow_mut(|current| *current = self.0.take());
            }
        }
        let checkpoint = self.checkpoint.clone();
        let restore = Restore(BUILDING.with_borrow_mut(|current| current.replace(self.checkpoint)));
        let model = build(self.vb)?;
        drop(restore);
        let pages = MappedPages(vec![checkpoint.clone()]);
        // The pages come in from disk in the background, in file order, while the artist
        // types or the text encoder runs, instead of one fault at a time inside the first step.
        // Nothing depends on it finishing; it stops once it holds the last reference to the
        // mapping (every layer that pointed into it is gone: the model was dropped).
        PAGING_IN.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name("easel-page-in".into()).spawn(move || {
            let _done = PageInDone;
            checkpoint.touch_pages(|| Arc::strong_count(&checkpoint) > 1);
        });
        if spawned.is_err() {
            PAGING_IN.fetch_sub(1, Ordering::SeqCst);
        }
        Ok((model, pages))
    }
}

/// The mapped files a model reads some of its weights from in place. Releasing takes those
/// pages out of the process's resident set while they stay in the page cache: the next read maps
/// them back without a disk read (a minor fault per 64 KB). The pipeline releases the components
/// a stage does not use, so a generation's peak memory holds one component's weights at a time
/// (the U-Net's while denoising), not every component's at once.
#[derive(Clone, Default)]
pub struct MappedPages(Vec<Arc<Checkpoint>>);

impl MappedPages {
    pub fn release(&self) {
        for checkpoint in &self.0 {
            checkpoint.release_in_place_pages();
        }
    }

    /// Bytes of the weights read in place that are in the process's resident set now (Linux;
    /// `None` elsewhere): to check and measure what releasing does.
    pub fn resident_bytes(&self) -> Option<u64> {
        self.0.iter().map(|c| c.resident_in_place_bytes()).sum()
    }

    /// Both sets of pages, released together.
    pub fn and(mut self, other: MappedPages) -> MappedPages {
        self.0.extend(other.0);
        self
    }
}

impl fmt::Debug for MappedPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MappedPages({} files)", self.0.len())
    }
}

/// A weight that lives in the memory-mapped checkpoint, f32 or f16 as stored.
#[derive(Clone)]
pub struct MappedTensor {
    /// Keeps the mapping alive as long as a layer points into it.
    _checkpoint: Arc<Checkpoint>,
    data: *const u8,
    dtype: DType,
    shape: Shape,
}

// SAFETY: `data` points into a read-only file mapping owned by `_checkpoint`, which is Send +
// Sync and outlives every copy of this struct; nothing ever writes through it.
unsafe impl Send for MappedTensor {}
unsafe impl Sync for MappedTensor {}

impl fmt::Debug for MappedTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MappedTensor({:?}, {:?})", self.dtype, self.shape)
    }
}

impl MappedTensor {
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The weight as the kernels take it.
    pub(crate) fn data(&self) -> WeightData<'_> {
        let len = self.shape.elem_count();
        // SAFETY: `lookup` checked that the mapping holds `len` elements of this dtype at
        // `data`, aligned for it; the mapping lives as long as `self`.
        unsafe {
            match self.dtype {
                DType::F16 => WeightData::F16(std::slice::from_raw_parts(self.data.cast(), len)),
                _ => WeightData::F32(std::slice::from_raw_parts(self.data.cast(), len)),
            }
        }
    }

    /// An owned copy, for the rare input Easel's kernels do not take.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let device = candle_core::Device::Cpu;
        match self.data() {
            WeightData::F32(w) => Tensor::from_slice(w, &self.shape, &device),
            WeightData::F16(w) => Tensor::from_slice(w, &self.shape, &device),
        }
    }
}

/// The weight `name` under `vb`, in place in the checkpoint being built (see
/// [`ModelWeights::build`]), when the copying load would have served exactly these numbers
/// in f32 or f16: on the CPU, asked for as f32 and stored as f32, or asked for as f16 (kept
/// as stored) and stored as f16 or f32. `None` — load a copy as usual — for anything else,
/// including a tensor that does not lie aligned for its dtype in the file.
pub(crate) fn lookup(vb: &VarBuilder, name: &str, shape: impl Into<Shape>) -> Option<MappedTensor> {
    if !vb.device().is_cpu() {
        return None;
    }
    let checkpoint = BUILDING.with_borrow(Option::clone)?;
    let prefix = vb.prefix();
    let full = if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") };
    let shape = shape.into();
    let (bytes, stored) = checkpoint.stored_bytes(&full, &shape)?;
    let served = match (vb.dtype(), stored) {
        (DType::F32, DType::F32) | (DType::F16, DType::F32) => DType::F32,
        (DType::F16, DType::F16) => DType::F16,
        _ => return None,
    };
    if !(bytes.as_ptr() as usize).is_multiple_of(served.size_in_bytes()) {
        return None;
    }
    let data = bytes.as_ptr();
    IN_PLACE_BYTES.set(IN_PLACE_BYTES.get() + bytes.len() as u64);
    checkpoint.note_in_place(bytes);
    Some(MappedTensor { _checkpoint: checkpoint, data, dtype: served, shape })
}

/// A convolution whose weight stays in the mapping; applied to (input, bias).
#[derive(Debug, Clone)]
pub struct MappedConv2d {
    pub weight: MappedTensor,
    pub stride: usize,
    pub padding: usize,
}

impl CustomOp2 for MappedConv2d {
    fn name(&self) -> &'static str {
        "easel-conv2d-mapped"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = contiguous_f32(b, b_layout, self.name())?;
        conv2d_forward((x, x_layout), self.weight.data(), self.weight.shape.dims(), bias, self.stride, self.padding)
    }
}

/// A linear layer whose weight stays in the mapping; applied to the input alone
/// ([`CustomOp1`]) or to (input, bias) ([`CustomOp2`]).
#[derive(Debug, Clone)]
pub struct MappedLinear {
    pub weight: MappedTensor,
}

impl CustomOp1 for MappedLinear {
    fn name(&self) -> &'static str {
        "easel-linear-mapped"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        linear_forward((x, x_layout), self.weight.data(), self.weight.shape.dims(), None)
    }
}

impl CustomOp2 for MappedLinear {
    fn name(&self) -> &'static str {
        "easel-linear-mapped"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let bias = contiguous_f32(b, b_layout, CustomOp2::name(self))?;
        linear_forward((x, x_layout), self.weight.data(), self.weight.shape.dims(), Some(bias))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::{Device, Module};

    use super::*;
    use crate::kernels::test_values;
    use crate::models::checkpoint::Source;
    use crate::models::nn::{
        conv2d, embedding, linear, linear_no_bias, Conv2d, Conv2dKind, Embedding, Linear, LinearKind,
    };

    fn tensor(shape: &[usize], seed: u32, dtype: DType) -> Tensor {
        let len = shape.iter().product();
        Tensor::from_vec(test_values(len, seed), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    fn close(a: &Tensor, b: &Tensor) {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    fn map(path: &Path, resolve: impl Fn(&str) -> Option<Source> + Send + Sync + 'static) -> Checkpoint {
        // SAFETY: a file this test wrote and nobody changes while it is mapped.
        Checkpoint::new(unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.unwrap(), resolve)
    }

    fn plain(name: &str) -> Option<Source> {
        Some(Source::Plain(name.to_string()))
    }

    /// A convolution and a linear layer stored in f32, a convolution stored in f16.
    fn stored() -> HashMap<String, Tensor> {
        HashMap::from([
            ("conv.weight".to_string(), tensor(&[6, 4, 3, 3], 1, DType::F32)),
            ("conv.bias".to_string(), tensor(&[6], 2, DType::F32)),
            ("fc.weight".to_string(), tensor(&[3, 5], 3, DType::F32)),
            ("fc.bias".to_string(), tensor(&[3], 4, DType::F32)),
            ("half.weight".to_string(), tensor(&[6, 4, 3, 3], 5, DType::F16)),
            ("half.bias".to_string(), tensor(&[6], 6, DType::F16)),
        ])
    }

    type Layers = (Conv2d, Linear, Conv2d);

    fn build(path: &Path, dtype: DType, map_weights: bool) -> Layers {
        ModelWeights::new(map(path, plain), dtype, &Device::Cpu)
            .build(map_weights, |vb| {
                Ok((
                    conv2d(4, 6, 3, 1, 1, vb.pp("conv"))?,
                    linear(5, 3, vb.pp("fc"))?,
                    conv2d(4, 6, 3, 1, 1, vb.pp("half"))?,
                ))
            })
            .unwrap()
    }

    fn mapped_dtype(conv: &Conv2d) -> Option<DType> {
        match &conv.kind {
            Conv2dKind::Mapped { op, .. } => Some(op.weight.dtype()),
            _ => None,
        }
    }

    #[test]
    fn layers_read_their_weights_in_place_and_compute_what_copies_compute() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        candle_core::safetensors::save(&stored(), &path).unwrap();
        let x = Tensor::from_vec(test_values(2 * 4 * 7 * 5, 7), (2, 4, 7, 5), &Device::Cpu).unwrap();
        let rows = Tensor::from_vec(test_values(2 * 4 * 5, 8), (2, 4, 5), &Device::Cpu).unwrap();
        let run = |(conv, fc, half): &Layers| {
            (bits(&conv.forward(&x).unwrap()), bits(&fc.forward(&rows).unwrap()), bits(&half.forward(&x).unwrap()))
        };

        // f16 requested (f16 kept as stored): every weight in place, in its stored dtype.
        let before = in_place_bytes_on_this_thread();
        let in_place = build(&path, DType::F16, true);
        let expected_bytes = (6 * 4 * 9 + 3 * 5) * 4 + 6 * 4 * 9 * 2;
        assert_eq!(in_place_bytes_on_this_thread() - before, expected_bytes as u64);
        assert_eq!(mapped_dtype(&in_place.0), Some(DType::F32));
        assert_eq!(mapped_dtype(&in_place.2), Some(DType::F16));
        assert!(
            matches!(&in_place.1.kind, LinearKind::Mapped { op, bias: Some(_) } if op.weight.dtype() == DType::F32)
        );
        let copied = build(&path, DType::F16, false);
        assert!(matches!(
            (&copied.0.kind, &copied.1.kind, &copied.2.kind),
            (Conv2dKind::Candle { .. }, LinearKind::Candle(_), Conv2dKind::Candle { .. })
        ));
        assert_eq!(run(&in_place), run(&copied), "in place and copied weights must give the same bits");

        // f32 requested (f16 widened at load): the f16 weight is copied and widened, the rest stays in place.
        let widened = build(&path, DType::F32, true);
        assert_eq!(mapped_dtype(&widened.0), Some(DType::F32));
        assert_eq!(mapped_dtype(&widened.2), None, "an f16 weight asked for as f32 is widened at load");
        assert_eq!(run(&widened), run(&copied));

        // Their page-in threads finish (and are counted as finished).
        wait_for_page_in();

        // Outside `build` nothing is looked up in place any more.
        let vb = ModelWeights::new(map(&path, plain), DType::F32, &Device::Cpu).vb;
        assert!(lookup(&vb.pp("fc"), "weight", (3, 5)).is_none());
    }

    #[test]
    fn parts_of_fused_and_reshaped_tensors_are_read_in_place_transposes_are_copied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        let fused = tensor(&[12, 4], 1, DType::F32);
        let conv1x1 = tensor(&[3, 5, 1, 1], 2, DType::F32);
        let transposed = tensor(&[3, 5], 3, DType::F32);
        let tensors = HashMap::from([
            ("in_proj_weight".to_string(), fused.clone()),
            ("proj_out.weight".to_string(), conv1x1.clone()),
            ("projection".to_string(), transposed.clone()),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let resolve = |name: &str| match name {
            "k.weight" => Some(Source::QkvPart { name: "in_proj_weight".into(), index: 1 }),
            "out.weight" => Some(Source::Conv1x1AsLinear("proj_out.weight".into())),
            "proj.weight" => Some(Source::Transposed("projection".into())),
            _ => None,
        };
        let (k, out, proj) = ModelWeights::new(map(&path, resolve), DType::F32, &Device::Cpu)
            .build(true, |vb| {
                Ok((
                    linear_no_bias(4, 4, vb.pp("k"))?,
                    linear_no_bias(5, 3, vb.pp("out"))?,
                    linear_no_bias(3, 5, vb.pp("proj"))?,
                ))
            })
            .unwrap();
        assert!(matches!(&k.kind, LinearKind::Mapped { .. }));
        assert!(matches!(&out.kind, LinearKind::Mapped { .. }));
        assert!(matches!(&proj.kind, LinearKind::Candle(_)), "a transposed weight cannot be read in place");

        let reference = |weight: Tensor| candle_nn::Linear::new(weight, None);
        let x4 = tensor(&[3, 4], 4, DType::F32);
        let x5 = tensor(&[3, 5], 5, DType::F32);
        let x3 = tensor(&[3, 3], 6, DType::F32);
        close(&k.forward(&x4).unwrap(), &reference(fused.narrow(0, 4, 4).unwrap()).forward(&x4).unwrap());
        close(&out.forward(&x5).unwrap(), &reference(conv1x1.reshape((3, 5)).unwrap()).forward(&x5).unwrap());
        close(&proj.forward(&x3).unwrap(), &reference(transposed.t().unwrap()).forward(&x3).unwrap());
    }

    #[test]
    fn paging_in_reads_every_tensor_including_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        let tensors = HashMap::from([
            ("empty".to_string(), Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap()),
            ("big".to_string(), tensor(&[3, 4099], 1, DType::F32)),
            ("half".to_string(), tensor(&[7], 2, DType::F16)),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let checkpoint = map(&path, plain);
        for name in ["empty", "big", "half"] {
            let (bytes, _) = checkpoint.stored_bytes(name, &tensors[name].shape().clone()).unwrap();
            checkpoint.note_in_place(bytes);
        }
        checkpoint.touch_pages(|| true);
        // Not wanted any more: returns before reading anything.
        checkpoint.touch_pages(|| false);
    }

    #[test]
    fn token_embeddings_are_read_in_place_and_give_the_copied_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("embeddings.safetensors");
        let tensors = HashMap::from([
            ("tok.weight".to_string(), tensor(&[10, 6], 1, DType::F32)),
            ("half.weight".to_string(), tensor(&[10, 6], 2, DType::F16)),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let ids = Tensor::new(&[[3u32, 0, 9], [9, 9, 1]], &Device::Cpu).unwrap();
        for (name, dtype) in [("tok", DType::F32), ("half", DType::F16)] {
            let build = |map_weights| {
                ModelWeights::new(map(&path, plain), dtype, &Device::Cpu)
                    .build(map_weights, |vb| embedding(10, 6, vb.pp(name)))
                    .unwrap()
            };
            let (in_place, copied) = (build(true), build(false));
            assert!(matches!(in_place, Embedding::Mapped { .. }), "{name}");
            assert!(matches!(copied, Embedding::Candle(_)), "{name}");
            let out = in_place.forward(&ids).unwrap();
            assert_eq!(out.dims(), &[2, 3, 6]);
            assert_eq!(bits(&out), bits(&copied.forward(&ids).unwrap()), "{name}");
            let past_the_end = Tensor::new(&[[10u32]], &Device::Cpu).unwrap();
            let err = in_place.forward(&past_the_end).unwrap_err().to_string();
            assert!(err.contains("outside the embedding table"), "{err}");
        }
    }

    /// Releasing takes a model's in-place weights out of the resident set, page-in leaves them
    /// out, and the next forward pass maps them back with the same numbers.
    #[cfg(target_os = "linux")]
    #[test]
    fn released_weights_leave_the_resident_set_and_come_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        let (rows, cols) = (256, 4096); // 4 MB of f32
        let tensors = HashMap::from([
            ("fc.weight".to_string(), tensor(&[rows, cols], 1, DType::F32)),
            ("fc.bias".to_string(), tensor(&[rows], 2, DType::F32)),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let (fc, pages) = ModelWeights::new(map(&path, plain), DType::F32, &Device::Cpu)
            .build_with_pages(true, |vb| linear(cols, rows, vb.pp("fc")))
            .unwrap();
        assert!(matches!(&fc.kind, LinearKind::Mapped { .. }));
        wait_for_page_in();
        let weight_bytes = (rows * cols * 4) as u64;
        if pages.resident_bytes().is_none() {
            eprintln!("/proc/self/pagemap is not readable here: residency not checked");
            return;
        }
        let resident = || pages.resident_bytes().unwrap();
        // Paging in warmed the page cache without keeping the pages mapped (a header page may stay).
        assert!(resident() < weight_bytes / 8, "after page-in: {} bytes resident", resident());

        let x = tensor(&[3, cols], 3, DType::F32);
        let first = bits(&fc.forward(&x).unwrap());
        assert!(resident() >= weight_bytes, "after a forward pass: {} bytes resident", resident());
        pages.release();
        assert!(resident() < weight_bytes / 8, "after release: {} bytes resident", resident());
        assert_eq!(bits(&fc.forward(&x).unwrap()), first, "released weights must read back the same");
        assert!(resident() >= weight_bytes);
        // Nothing mapped, nothing to release or measure.
        assert_eq!(MappedPages::default().resident_bytes(), Some(0));
    }

    /// A safetensors file written by hand, tensors in the given order: older writers did not
    /// sort by alignment, so an f32 tensor can follow an odd-sized f16 one.
    fn write_unaligned(path: &Path, weight: &[f32]) {
        let header = format!(
            r#"{{"odd":{{"dtype":"F16","shape":[3],"data_offsets":[0,6]}},"fc.weight":{{"dtype":"F32","shape":[3,5],"data_offsets":[6,{}]}}}}"#,
            6 + weight.len() * 4
        );
        let mut header = header.into_bytes();
        while (8 + header.len()) % 8 != 0 {
            header.push(b' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&[0; 6]);
        bytes.extend(weight.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_weight_that_lies_unaligned_in_the_file_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unaligned.safetensors");
        let weight = test_values(15, 1);
        write_unaligned(&path, &weight);
        crate::models::safetensors_check::validate_safetensors(&path).unwrap();
        let fc = ModelWeights::new(map(&path, plain), DType::F32, &Device::Cpu)
            .build(true, |vb| linear_no_bias(5, 3, vb.pp("fc")))
            .unwrap();
        assert!(matches!(&fc.kind, LinearKind::Candle(_)));
        let x = tensor(&[2, 5], 2, DType::F32);
        let reference = candle_nn::Linear::new(Tensor::from_vec(weight, (3, 5), &Device::Cpu).unwrap(), None);
        close(&fc.forward(&x).unwrap(), &reference.forward(&x).unwrap());
    }
}
