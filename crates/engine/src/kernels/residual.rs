//! Residual connections added in place: `fresh += residual`.
//!
//! Every ResNet and transformer block ends in `output + residual`, and candle's add allocates a
//! third activation for the sum while both operands are alive. At the U-Net's upper level of a
//! 512×512 CFG step each is 10.5 MB, and the sums sit at the step's memory peaks; adding into
//! the block's freshly computed output instead needs no new buffer. IEEE addition commutes, so
//! the result is the same to the bit as `output + residual` (tested).

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// Values per parallel task (256 KB): enough work per task, still several tasks per core.
const CHUNK: usize = 64 * 1024;

struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "easel-add-assign"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, src: &CpuStorage, src_l: &Layout) -> Result<()> {
        let src = super::contiguous_f32(src, src_l, self.name())?;
        let CpuStorage::F32(dst) = dst else {
            candle_core::bail!("{}: expected f32", self.name());
        };
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("{}: output is not contiguous", self.name());
        };
        let dst = &mut dst[start..end];
        if dst.len() != src.len() {
            candle_core::bail!("{}: {} values += {} values", self.name(), dst.len(), src.len());
        }
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
        });
        Ok(())
    }
}

/// `fresh + residual`, written into `fresh` where the CPU kernels apply (same shapes, both
/// contiguous f32 on the CPU), else candle's add.
///
/// `fresh` must be a block's newly computed output that no other live tensor shares storage
/// with (a view of it would see the sum); the model code passes only such outputs.
pub fn add_residual(fresh: Tensor, residual: &Tensor) -> Result<Tensor> {
    let in_place = super::applies_to(&fresh)
        && super::applies_to(residual)
        && fresh.shape() == residual.shape()
        && fresh.is_contiguous()
        && residual.is_contiguous();
    // candle refuses (before writing anything) when the two share storage: add out of place.
    if in_place && fresh.inplace_op2(residual, &AddAssign).is_ok() {
        return Ok(fresh);
    }
    fresh + residual
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::kernels::test_values;

    #[test]
    fn adding_in_place_gives_the_bits_of_a_new_sum_and_leaves_the_residual_alone() {
        let len = 17 * (3 * CHUNK / 17 + 100); // several parallel chunks, the last one short
        let fresh = Tensor::from_vec(test_values(len, 1), (len / 17, 17), &Device::Cpu).unwrap();
        let residual = Tensor::from_vec(test_values(len, 2), (len / 17, 17), &Device::Cpu).unwrap();
        let expected = (&fresh + &residual).unwrap();
        // A second handle on the same storage shows whether the sum was written in place.
        let alias = fresh.clone();
        let sum = add_residual(fresh, &residual).unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect::<Vec<_>>()
        };
        assert_eq!(bits(&sum), bits(&expected));
        assert_eq!(bits(&alias), bits(&expected), "the sum went to a new buffer");
        assert_eq!(residual.flatten_all().unwrap().to_vec1::<f32>().unwrap(), test_values(len, 2));
    }

    #[test]
    fn operands_of_different_shapes_are_an_error_not_a_write() {
        let fresh = Tensor::from_vec(test_values(6, 1), (2, 3), &Device::Cpu).unwrap();
        let other = Tensor::from_vec(test_values(4, 2), (2, 2), &Device::Cpu).unwrap();
        assert!(add_residual(fresh, &other).is_err());
    }

    #[test]
    fn a_residual_sharing_the_output_storage_is_added_out_of_place() {
        let x = Tensor::from_vec(test_values(1000, 3), 1000, &Device::Cpu).unwrap();
        let doubled = add_residual(x.clone(), &x).unwrap();
        assert_eq!(doubled.to_vec1::<f32>().unwrap(), (&x + &x).unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(x.to_vec1::<f32>().unwrap(), test_values(1000, 3));
    }
}
