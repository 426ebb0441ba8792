//! Quantised weights on CUDA (`kernels/quant.cu`): a device copy of a [`QuantMatrix`], its
//! dequantisation (the same bits as the CPU's) and the fused matrix-vector product.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use llama_core::cuda::{CudaDevice, KernelSource};
use llama_core::{bf16, DType};

use super::{alloc, grid_for, kernel_source, launched, to_u32};
use crate::error::{check_len, Result};
use crate::quant::nf4::{dynamic_map, DOUBLE_QUANT_BLOCK};
use crate::quant::{Nf4DoubleQuant, QuantMatrix};

const QUANT: KernelSource = kernel_source!("quant");

/// A [N, K] block-quantised weight on a device.
pub struct CudaQuantMatrix {
    dtype: DType,
    rows: usize,
    cols: u32,
    bytes: CudaSlice<u8>,
}

/// The kernels' name for a quantised dtype.
fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::Q4_0 => "q4_0",
        DType::Q4_1 => "q4_1",
        DType::Q8_0 => "q8_0",
        DType::Q4K => "q4_k",
        DType::Q5K => "q5_k",
        DType::Q6K => "q6_k",
        DType::Nf4 => "nf4",
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("QuantMatrix holds quantised kinds"),
    }
}

/// Warps per block of the matrix-vector kernels.
const MATVEC_WARPS: u32 = 8;
/// From this many rows, the kernel that gives each warp four rows.
const ROWS_FOR_MATVEC4: usize = 4096;

impl CudaQuantMatrix {
    /// Copies `w` to `device`.
    pub fn upload(device: &CudaDevice, w: &QuantMatrix) -> Result<CudaQuantMatrix> {
        let (rows, cols) = w.shape();
        Ok(CudaQuantMatrix {
            dtype: w.dtype(),
            rows,
            cols: to_u32("cols", cols)?,
            bytes: device.htod(w.bytes())?,
        })
    }

    /// (N, K).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols as usize)
    }

    /// The whole matrix in f32, [N, K], in a new buffer.
    pub fn dequantize(&self, device: &CudaDevice) -> Result<CudaSlice<f32>> {
        let mut out = alloc::<f32>(device, (self.rows * self.cols as usize).max(1))?;
        if self.rows > 0 {
            self.dequantize_into(device, &mut out)?;
        }
        Ok(out)
    }

    /// The whole matrix in f32, [N, K], written into `out` (a scratch buffer reused across
    /// layers, as the prefill does).
    /// The values, row-major, into the first rows · cols of `out` (which may be longer: one
    /// buffer can serve matrices of several sizes).
    pub fn dequantize_into(&self, device: &CudaDevice, out: &mut CudaSlice<f32>) -> Result<()> {
        self.dequantize_as(device, out, "dequantize")
    }

    /// [`Self::dequantize_into`] rounded to bf16 (the f32 values' nearest, ties to even): the
    /// frozen operand of a QLoRA product, with no f32 copy in between.
    pub fn dequantize_into_bf16(
        &self,
        device: &CudaDevice,
        out: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        self.dequantize_as(device, out, "dequantize_bf16")
    }

    fn dequantize_as<T: DeviceRepr>(
        &self,
        device: &CudaDevice,
        out: &mut CudaSlice<T>,
        kernel: &str,
    ) -> Result<()> {
        let n = self.rows * self.cols as usize;
        if out.len() < n {
            check_len("cuda dequantize_into", "out", out.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let name = format!("{kernel}_{}", suffix(self.dtype));
        let f = device.function(&QUANT, &name)?;
        let mut launch = device.stream().launch_builder(&f);
        launch
            .arg(&self.bytes)
            .arg(out)
            .arg(&self.rows)
            .arg(&self.cols);
        // SAFETY: bytes hold rows rows of whole blocks (checked by QuantMatrix::new), out
        // rows · cols values (checked); one thread per 8 weights.
        launched(&name, unsafe { launch.launch(grid_for(n / 8)) })
    }

    /// y [N] = W · x, x [K]: a warp per row or per four rows, each thread decoding 8 weights at a
    /// time straight into the dot product.
    pub fn matvec(
        &self,
        device: &CudaDevice,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_len("cuda matvec", "x", x.len(), self.cols as usize)?;
        check_len("cuda matvec", "y", y.len(), self.rows)?;
        if self.rows == 0 {
            return Ok(());
        }
        // Four rows per warp once there are enough rows to fill the GPU that way.
        let rows_per_warp = if self.rows >= ROWS_FOR_MATVEC4 { 4 } else { 1 };
        let kernel = if rows_per_warp == 4 {
            "matvec4"
        } else {
            "matvec"
        };
        let name = format!("{kernel}_{}", suffix(self.dtype));
        let f = device.function(&QUANT, &name)?;
        let mut launch = device.stream().launch_builder(&f);
        launch
            .arg(&self.bytes)
            .arg(x)
            .arg(y)
            .arg(&self.rows)
            .arg(&self.cols);
        let warps = self.rows.div_ceil(rows_per_warp);
        let config = LaunchConfig {
            grid_dim: (
                to_u32("blocks", warps.div_ceil(MATVEC_WARPS as usize))?,
                1,
                1,
            ),
            block_dim: (32 * MATVEC_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as for dequantize; x holds cols values and y rows (checked).
        launched(&name, unsafe { launch.launch(config) })
    }
}

/// An NF4 matrix [N, K] on a device with its absmaxes double-quantised ([`Nf4DoubleQuant`],
/// as bitsandbytes stores QLoRA's base weights): 33 bytes per 64 weights instead of 36.
pub struct CudaNf4DoubleQuant {
    rows: usize,
    cols: usize,
    codes: CudaSlice<u8>,
    absmax_codes: CudaSlice<u8>,
    scales: CudaSlice<f32>,
    /// bitsandbytes' dynamic map, which the absmax codes index.
    map: CudaSlice<f32>,
    offset: f32,
}

// The kernel groups absmaxes by 256 blocks, as the host's compression does.
const _: () = assert!(DOUBLE_QUANT_BLOCK == 256);

impl CudaNf4DoubleQuant {
    /// Compresses the NF4 matrix `w` (an error for other dtypes) and copies it to `device`.
    pub fn upload(device: &CudaDevice, w: &QuantMatrix) -> Result<CudaNf4DoubleQuant> {
        let dq = Nf4DoubleQuant::compress(w)?;
        let (rows, cols) = w.shape();
        Ok(CudaNf4DoubleQuant {
            rows,
            cols,
            codes: device.htod(&dq.codes)?,
            absmax_codes: device.htod(&dq.absmax_codes)?,
            scales: device.htod(&dq.absmax_scales)?,
            map: device.htod(&dynamic_map())?,
            offset: dq.offset,
        })
    }

    /// (N, K).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The matrix in bf16, row-major, into the first rows · cols of `out`: the values the CPU
    /// decodes from [`Nf4DoubleQuant::expand`]'s blocks, rounded to bf16.
    pub fn dequantize_into_bf16(
        &self,
        device: &CudaDevice,
        out: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let n = self.rows * self.cols;
        if out.len() < n {
            check_len("cuda dequantize_into_bf16", "out", out.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let name = "dequantize_bf16_nf4_dq";
        let f = device.function(&QUANT, name)?;
        let quarters = n / 8;
        let mut launch = device.stream().launch_builder(&f);
        launch
            .arg(&self.codes)
            .arg(&self.absmax_codes)
            .arg(&self.scales)
            .arg(&self.map)
            .arg(&self.offset)
            .arg(out)
            .arg(&quarters);
        // SAFETY: codes hold 32 bytes for each of the n / 64 blocks, absmax_codes one per
        // block, scales one per 256 blocks (Nf4DoubleQuant::compress), map 256 values, out at
        // least n (checked); one thread per 8 weights.
        launched(name, unsafe { launch.launch(grid_for(quarters)) })
    }
}
