//! Typed buffers behind a `Tensor`, on the host or on a CUDA device.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use crate::DType;

/// Host storage: one typed vector per float dtype, raw bytes for block-quantised kinds.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// Block-quantised data, `DType::block_bytes` bytes per block.
    Blocks(Vec<u8>),
}

/// Device storage, mirroring [`CpuStorage`].
#[derive(Debug)]
pub enum CudaStorage {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
    Blocks(CudaSlice<u8>),
}

/// A tensor's buffer on whichever device holds it.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

impl CpuStorage {
    /// The storage as raw bytes in native (little-endian) order.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::Blocks(v) => v,
        }
    }
}

/// A float element type that a tensor can hold: `f32`, `half::f16` or `half::bf16`.
///
/// Conversions go through f32, rounding to nearest-even as the CUDA kernels do, so that the
/// CPU and GPU paths give the same bits.
pub trait Element:
    bytemuck::Pod + DeviceRepr + ValidAsZeroBits + Send + Sync + std::fmt::Debug + 'static
{
    /// The dtype a tensor of this element has.
    const DTYPE: DType;
    /// Widens to f32 (exact for all three types).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type, nearest-even.
    fn from_f32(v: f32) -> Self;
    /// The host vector, if `storage` holds this type.
    fn cpu_slice(storage: &CpuStorage) -> Option<&[Self]>;
    /// The mutable host vector, if `storage` holds this type.
    fn cpu_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
    /// Wraps a host vector.
    fn into_cpu(data: Vec<Self>) -> CpuStorage;
    /// The device buffer, if `storage` holds this type.
    fn cuda_slice(storage: &CudaStorage) -> Option<&CudaSlice<Self>>;
    /// Wraps a device buffer.
    fn into_cuda(data: CudaSlice<Self>) -> CudaStorage;
}

macro_rules! impl_element {
    ($ty:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $ty {
            const DTYPE: DType = DType::$variant;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            fn cpu_slice(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn cpu_slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_cpu(data: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(data)
            }
            fn cuda_slice(storage: &CudaStorage) -> Option<&CudaSlice<Self>> {
                match storage {
                    CudaStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_cuda(data: CudaSlice<Self>) -> CudaStorage {
                CudaStorage::$variant(data)
            }
        }
    };
}

impl_element!(f32, F32, |v: f32| v, |v: f32| v);
impl_element!(f16, F16, f16::to_f32, f16::from_f32);
impl_element!(bf16, BF16, bf16_to_f32, bf16_from_f32);

/// bf16 → f32: the bits shifted into place, as PyTorch and the kernels do — exact for every
/// value and every NaN payload (`half` would also set a NaN's quiet bit). A plain shift, so
/// loops over it vectorise.
#[inline(always)]
fn bf16_to_f32(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// f32 → bf16, round to nearest-even, NaN kept NaN with the quiet bit set: the same bits as
/// `half::bf16::from_f32` and the kernels' `from_f32<bf16_t>`, but branch-free so that loops
/// over it vectorise.
#[inline(always)]
fn bf16_from_f32(v: f32) -> bf16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let quiet_nan = (x >> 16) | 0x40;
    let is_nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    bf16::from_bits(if is_nan { quiet_nan } else { rounded } as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_conversions_equal_the_half_crate_bit_for_bit_except_nan_payloads() {
        // Every 4099th bit pattern (all exponents, NaNs and infinities included) plus the
        // rounding edge cases.
        let edges = [
            0x3f80_8000u32,
            0x3f81_8000,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0001,
            0x0000_8000,
        ];
        for bits in (0..=u32::MAX).step_by(4099).chain(edges) {
            let v = f32::from_bits(bits);
            assert_eq!(
                bf16_from_f32(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "from_f32({bits:#010x})"
            );
            let b = bf16::from_bits(bits as u16);
            if b.is_nan() {
                assert!(bf16_to_f32(b).is_nan());
                assert_eq!(bf16_to_f32(b).to_bits(), (bits as u16 as u32) << 16);
            } else {
                assert_eq!(bf16_to_f32(b).to_bits(), b.to_f32().to_bits());
            }
        }
    }
}
