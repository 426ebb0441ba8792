//! `Tensor`: a contiguous row-major buffer with a shape, a dtype and a device.
//!
//! There is no autograd and no strided view: each op in the higher crates has an explicit
//! forward and backward over contiguous buffers, as llm.c does. This type carries data between
//! them, between devices, and in and out of files. Device dispatch happens here and nowhere else.

use std::borrow::Cow;
use std::path::Path;

use cudarc::driver::CudaSlice;

use crate::cuda::{self, CudaDevice};
use crate::storage::{CpuStorage, Element, Storage};
use crate::{cpu, DType, Device, Error, Result, Shape};

/// A contiguous row-major tensor on one device.
#[derive(Debug)]
pub struct Tensor {
    shape: Shape,
    dtype: DType,
    device: Device,
    storage: Storage,
}

impl Tensor {
    /// A host tensor that takes ownership of `data`; its length must equal the shape's size.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = checked_shape(shape.into(), T::DTYPE, data.len())?;
        Ok(Tensor {
            shape,
            dtype: T::DTYPE,
            device: Device::Cpu,
            storage: Storage::Cpu(T::into_cpu(data)),
        })
    }

    /// A host tensor copied from `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape)
    }

    /// A host tensor of any dtype from raw little-endian bytes (block-quantised data included).
    /// The byte count must be exactly what `dtype` needs for the shape.
    pub fn from_raw_bytes(bytes: &[u8], dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let elems = shape
            .checked_elem_count()
            .ok_or_else(|| overflow(&shape, dtype))?;
        let needed = dtype
            .storage_bytes(elems)
            .ok_or_else(|| Error::InvalidShape {
                shape: shape.dims().to_vec(),
                dtype,
                reason: format!(
                    "{elems} elements are not whole blocks of {}",
                    dtype.block_len()
                ),
            })?;
        if needed != bytes.len() {
            return Err(Error::InvalidShape {
                shape: shape.dims().to_vec(),
                dtype,
                reason: format!("needs {needed} bytes, got {}", bytes.len()),
            });
        }
        // pod_collect_to_vec copies into a properly aligned vector whatever the source alignment.
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            _ => CpuStorage::Blocks(bytes.to_vec()),
        };
        Ok(Tensor {
            shape,
            dtype,
            device: Device::Cpu,
            storage: Storage::Cpu(storage),
        })
    }

    /// A tensor of zeros on `device`.
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        let shape = shape.into();
        let elems = shape
            .checked_elem_count()
            .ok_or_else(|| overflow(&shape, dtype))?;
        let bytes = dtype
            .storage_bytes(elems)
            .ok_or_else(|| overflow(&shape, dtype))?;
        let host = Tensor::from_raw_bytes(&vec![0u8; bytes], dtype, shape)?;
        host.to_device(device)
    }

    /// A host tensor from a safetensors view (F32, F16 or BF16), copying the bytes.
    pub fn from_safetensors(view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
        use safetensors::Dtype as S;
        let dtype = match view.dtype() {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            other => {
                return Err(Error::Safetensors(format!(
                    "tensor dtype {other:?} is not a float dtype (F32, F16, BF16)"
                )))
            }
        };
        Tensor::from_raw_bytes(view.data(), dtype, view.shape())
    }

    /// Writes `tensors` (host, float dtypes) to a safetensors file, atomically.
    pub fn save_safetensors(tensors: &[(&str, &Tensor)], path: &Path) -> Result<()> {
        let views = tensors
            .iter()
            .map(|(name, t)| Ok((name.to_string(), t.safetensors_view()?)))
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| Error::Safetensors(format!("{}: {e}", path.display())))?;
        crate::cache::write_atomic(path, &bytes)
    }

    /// A borrowed view that `safetensors::serialize` accepts (host tensors of float dtype).
    pub fn safetensors_view(&self) -> Result<SafetensorsView<'_>> {
        let dtype = match self.dtype {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            dtype => {
                return Err(Error::UnsupportedDType {
                    op: "safetensors export",
                    dtype,
                })
            }
        };
        Ok(SafetensorsView {
            dtype,
            shape: self.shape.dims(),
            bytes: self.cpu_storage("safetensors export")?.as_bytes(),
        })
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the data.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    /// Bytes of storage.
    pub fn storage_bytes(&self) -> usize {
        self.dtype
            .storage_bytes(self.elem_count())
            .unwrap_or(usize::MAX)
    }

    /// The same data under another shape with the same element count.
    pub fn reshape(self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = checked_shape(shape.into(), self.dtype, self.elem_count())?;
        Ok(Tensor { shape, ..self })
    }

    /// The underlying storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The host data as a slice of `T` (the tensor must be on the CPU with dtype `T`).
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        let storage = self.cpu_storage("as_slice")?;
        T::cpu_slice(storage).ok_or(self.dtype_mismatch::<T>())
    }

    /// The host data as a mutable slice of `T`.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        let err = self.dtype_mismatch::<T>();
        match &mut self.storage {
            Storage::Cpu(s) => T::cpu_slice_mut(s).ok_or(err),
            Storage::Cuda(_) => Err(wrong_device("as_mut_slice", "the CPU", self.device)),
        }
    }

    /// The device buffer (the tensor must be on a CUDA device with dtype `T`).
    pub fn as_cuda_slice<T: Element>(&self) -> Result<&CudaSlice<T>> {
        match &self.storage {
            Storage::Cuda(s) => T::cuda_slice(s).ok_or(self.dtype_mismatch::<T>()),
            Storage::Cpu(_) => Err(wrong_device("as_cuda_slice", "a CUDA device", self.device)),
        }
    }

    /// Copies the data to a host vector of `T`, which must be the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        match &self.storage {
            Storage::Cpu(s) => T::cpu_slice(s)
                .map(<[T]>::to_vec)
                .ok_or(self.dtype_mismatch::<T>()),
            Storage::Cuda(s) => {
                let slice = T::cuda_slice(s).ok_or(self.dtype_mismatch::<T>())?;
                CudaDevice::get(self.cuda_ordinal()?)?.dtoh(slice)
            }
        }
    }

    /// Copies the data to a host `Vec<f32>`, widening f16/bf16 exactly.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.to_dtype(DType::F32)?
            .to_device(Device::Cpu)?
            .to_vec::<f32>()
    }

    /// A copy of this tensor on `device` (a plain copy when it is already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        let storage = match (&self.storage, device) {
            (Storage::Cpu(s), Device::Cpu) => Storage::Cpu(s.clone()),
            (Storage::Cpu(s), Device::Cuda(ordinal)) => {
                Storage::Cuda(CudaDevice::get(ordinal)?.upload(s)?)
            }
            (Storage::Cuda(s), Device::Cpu) => {
                Storage::Cpu(CudaDevice::get(self.cuda_ordinal()?)?.download(s)?)
            }
            (Storage::Cuda(s), Device::Cuda(ordinal)) => {
                let host = CudaDevice::get(self.cuda_ordinal()?)?.download(s)?;
                Storage::Cuda(CudaDevice::get(ordinal)?.upload(&host)?)
            }
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            device,
            storage,
        })
    }

    /// A copy converted to the float dtype `dtype`, on the same device (round to nearest-even).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if !self.dtype.is_float() {
            return Err(Error::UnsupportedDType {
                op: "cast",
                dtype: self.dtype,
            });
        }
        let storage = match &self.storage {
            Storage::Cpu(s) => Storage::Cpu(cpu::cast(s, dtype)?),
            Storage::Cuda(s) => Storage::Cuda(cuda::ops::cast(
                &*CudaDevice::get(self.cuda_ordinal()?)?,
                s,
                dtype,
            )?),
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype,
            device: self.device,
            storage,
        })
    }

    /// Element-wise sum of two tensors of the same shape, dtype and device, computed in f32.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.check_same("add", rhs)?;
        let storage = match (&self.storage, &rhs.storage) {
            (Storage::Cpu(a), Storage::Cpu(b)) => Storage::Cpu(cpu::add(a, b, self.dtype)?),
            (Storage::Cuda(a), Storage::Cuda(b)) => Storage::Cuda(cuda::ops::add(
                &*CudaDevice::get(self.cuda_ordinal()?)?,
                a,
                b,
                self.dtype,
            )?),
            _ => unreachable!("check_same compared the devices"),
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            device: self.device,
            storage,
        })
    }

    fn check_same(&self, op: &'static str, rhs: &Tensor) -> Result<()> {
        if self.shape != rhs.shape {
            return Err(Error::ShapeMismatch {
                op,
                lhs: self.dims().to_vec(),
                rhs: rhs.dims().to_vec(),
            });
        }
        if self.device != rhs.device {
            return Err(Error::DeviceMismatch {
                op,
                lhs: self.device,
                rhs: rhs.device,
            });
        }
        if self.dtype != rhs.dtype {
            return Err(Error::DTypeMismatch {
                requested: self.dtype,
                actual: rhs.dtype,
            });
        }
        if !self.dtype.is_float() {
            return Err(Error::UnsupportedDType {
                op,
                dtype: self.dtype,
            });
        }
        Ok(())
    }

    fn cpu_storage(&self, op: &'static str) -> Result<&CpuStorage> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s),
            Storage::Cuda(_) => Err(wrong_device(op, "the CPU", self.device)),
        }
    }

    fn cuda_ordinal(&self) -> Result<usize> {
        match self.device {
            Device::Cuda(ordinal) => Ok(ordinal),
            Device::Cpu => Err(wrong_device("cuda", "a CUDA device", self.device)),
        }
    }

    fn dtype_mismatch<T: Element>(&self) -> Error {
        Error::DTypeMismatch {
            requested: T::DTYPE,
            actual: self.dtype,
        }
    }
}

/// A host tensor's bytes as `safetensors::serialize` wants them.
pub struct SafetensorsView<'a> {
    dtype: safetensors::Dtype,
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl safetensors::View for SafetensorsView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn checked_shape(shape: Shape, dtype: DType, got: usize) -> Result<Shape> {
    let expected = shape
        .checked_elem_count()
        .ok_or_else(|| overflow(&shape, dtype))?;
    if expected != got {
        return Err(Error::ElementCount {
            shape: shape.dims().to_vec(),
            expected,
            got,
        });
    }
    Ok(shape)
}

fn overflow(shape: &Shape, dtype: DType) -> Error {
    Error::InvalidShape {
        shape: shape.dims().to_vec(),
        dtype,
        reason: "the size overflows".into(),
    }
}

fn wrong_device(op: &'static str, needed: &'static str, actual: Device) -> Error {
    Error::WrongDevice { op, needed, actual }
}
