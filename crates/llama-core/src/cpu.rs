//! The CPU side of the element-wise ops that `llama-core` itself provides (add, cast).
//! Each value is widened to f32, combined, and rounded back: the CUDA kernels in
//! `kernels/elementwise.cu` do the same, so both give identical bits.

use rayon::prelude::*;

use crate::storage::{CpuStorage, Element};
use crate::{DType, Error, Result};

/// Below this many elements the thread pool costs more than it saves.
const PAR_MIN: usize = 1 << 15;

/// out[i] = round(a[i] + b[i]) with the sum taken in f32.
pub(crate) fn add(a: &CpuStorage, b: &CpuStorage, dtype: DType) -> Result<CpuStorage> {
    fn typed<T: Element>(a: &[T], b: &[T]) -> CpuStorage {
        let sum = |(x, y): (&T, &T)| T::from_f32(x.to_f32() + y.to_f32());
        let out = if a.len() >= PAR_MIN {
            a.par_iter().zip(b.par_iter()).map(sum).collect()
        } else {
            a.iter().zip(b).map(sum).collect()
        };
        T::into_cpu(out)
    }
    match (a, b) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => Ok(typed(a, b)),
        (CpuStorage::F16(a), CpuStorage::F16(b)) => Ok(typed(a, b)),
        (CpuStorage::BF16(a), CpuStorage::BF16(b)) => Ok(typed(a, b)),
        _ => Err(Error::UnsupportedDType { op: "add", dtype }),
    }
}

/// Converts between float dtypes through f32 (round to nearest-even).
pub(crate) fn cast(src: &CpuStorage, dst: DType) -> Result<CpuStorage> {
    match src {
        CpuStorage::F32(v) => cast_from(v, dst),
        CpuStorage::F16(v) => cast_from(v, dst),
        CpuStorage::BF16(v) => cast_from(v, dst),
        CpuStorage::Blocks(_) => Err(Error::UnsupportedDType {
            op: "cast",
            dtype: dst,
        }),
    }
}

fn cast_from<S: Element>(src: &[S], dst: DType) -> Result<CpuStorage> {
    fn convert<S: Element, D: Element>(src: &[S]) -> CpuStorage {
        let out = if src.len() >= PAR_MIN {
            src.par_iter().map(|v| D::from_f32(v.to_f32())).collect()
        } else {
            src.iter().map(|v| D::from_f32(v.to_f32())).collect()
        };
        D::into_cpu(out)
    }
    match dst {
        DType::F32 => Ok(convert::<S, f32>(src)),
        DType::F16 => Ok(convert::<S, half::f16>(src)),
        DType::BF16 => Ok(convert::<S, half::bf16>(src)),
        _ => Err(Error::UnsupportedDType {
            op: "cast",
            dtype: dst,
        }),
    }
}
