//! Dense linear layers on CUDA through cuBLAS (`cublasGemmEx`, f32 compute for every input
//! type; large products through cublasLt's fastest algorithm for their shape, `gemm_tune.rs`),
//! one handle per device on the device's stream. Row-major [M, K] buffers are cuBLAS's
//! column-major [K, M], so each product below is the transposed one in cuBLAS's terms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use llama_core::cuda::CudaDevice;
use llama_core::DType;

use super::gemm_tune::{self, GemmKey, Product};
use super::{per_device, to_u32, CudaElement};
use crate::error::{check_len, rows_of, Result};

/// The cuBLAS handle of a device, created on first use.
fn handle(device: &CudaDevice) -> Result<Arc<CudaBlas>> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<CudaBlas>>>> = OnceLock::new();
    per_device(&HANDLES, device, || {
        // SAFETY: only dlopens the library under its usual names to see whether it is there.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(llama_core::Error::CudaUnavailable(
                "the cuBLAS library (libcublas.so) was not found".into(),
            )
            .into());
        }
        CudaBlas::new(device.stream().clone())
            .map_err(|e| llama_core::Error::cuda("cublasCreate", e).into())
    })
}

fn data_type(dtype: DType) -> sys::cudaDataType {
    match dtype {
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        _ => sys::cudaDataType::CUDA_R_32F,
    }
}

/// A column-major operand: buffer, first element, leading dimension, transposed or not.
struct Operand<'a, T> {
    data: &'a CudaSlice<T>,
    offset: usize,
    transpose: bool,
    ld: usize,
}

impl<'a, T> Operand<'a, T> {
    /// The whole buffer from its first element.
    fn whole(data: &'a CudaSlice<T>, transpose: bool, ld: usize) -> Self {
        Operand {
            data,
            offset: 0,
            transpose,
            ld,
        }
    }
}

/// Columns `first..first + width` of a row-major buffer whose rows are `stride` values long: a
/// [rows, width] matrix kept side by side with others (a LoRA group's branches share one
/// [rows, g·r] buffer), read or written in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cols {
    pub first: usize,
    pub width: usize,
    pub stride: usize,
}

impl Cols {
    /// Every column of rows `width` long.
    pub fn whole(width: usize) -> Cols {
        Cols {
            first: 0,
            width,
            stride: width,
        }
    }

    /// The rows of a buffer of `len` values these columns lie in (an error unless `len` is
    /// whole rows and the columns fit in a row).
    fn rows(&self, op: &'static str, what: &str, len: usize) -> Result<usize> {
        if self.first + self.width > self.stride {
            return Err(crate::OpsError::Shape {
                op,
                reason: format!(
                    "{what}: columns {}..{} of rows {} long",
                    self.first,
                    self.first + self.width,
                    self.stride
                ),
            });
        }
        rows_of(op, what, len, self.stride)
    }
}

/// How a product lands in its output: C = alpha · product (+ C when `accumulate`).
#[derive(Clone, Copy)]
struct Epilogue {
    alpha: f32,
    accumulate: bool,
}

impl Epilogue {
    fn plain(accumulate: bool) -> Epilogue {
        Epilogue {
            alpha: 1.0,
            accumulate,
        }
    }
}

/// C (col-major [m, n], leading dimension `c_cols.stride`, from element `c_cols.first` on) =
/// alpha · op(A) · op(B) (+ C when accumulating), f32 compute.
fn gemm<A: CudaElement, C: CudaElement>(
    device: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    a: Operand<A>,
    b: Operand<A>,
    (c, c_cols): (&mut CudaSlice<C>, Cols),
    epilogue: Epilogue,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let blas = handle(device)?;
    let (m_i, n_i, k_i) = (to_u32("m", m)?, to_u32("n", n)?, to_u32("k", k)?);
    let op = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let alpha = epilogue.alpha;
    let beta = if epilogue.accumulate { 1.0f32 } else { 0.0 };
    let stream = device.stream();
    let (a_ptr, _ra) = a.data.device_ptr(stream);
    let (b_ptr, _rb) = b.data.device_ptr(stream);
    let (c_ptr, _rc) = c.device_ptr_mut(stream);
    let at = |ptr: u64, offset: usize, size: usize| ptr + (offset * size) as u64;
    let (a_ptr, b_ptr) = (
        at(a_ptr, a.offset, std::mem::size_of::<A>()),
        at(b_ptr, b.offset, std::mem::size_of::<A>()),
    );
    let c_ptr = at(c_ptr, c_cols.first, std::mem::size_of::<C>());
    let (lda, ldb, ldc) = (
        to_u32("lda", a.ld)?,
        to_u32("ldb", b.ld)?,
        to_u32("ldc", c_cols.stride)?,
    );
    // cublasGemmEx with cuBLAS's default algorithm into the C at address `c`.
    let default = |c: u64| -> Result<()> {
        // SAFETY: the callers check that A, B and C hold the [m, k], [k, n], [m, n] operands
        // their offsets and leading dimensions describe (`c` is C or the tuner's scratch of
        // C's layout); alpha and beta are f32 as COMPUTE_32F requires, and the handle is
        // bound to this device's stream, on which the pointers were recorded.
        unsafe {
            blas::gemm_ex(
                *blas.handle(),
                op(a.transpose),
                op(b.transpose),
                m_i as i32,
                n_i as i32,
                k_i as i32,
                (&alpha) as *const f32 as *const _,
                a_ptr as *const _,
                data_type(A::DTYPE),
                lda as i32,
                b_ptr as *const _,
                data_type(A::DTYPE),
                ldb as i32,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                data_type(C::DTYPE),
                ldc as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| llama_core::Error::cuda("cublasGemmEx", e).into())
    };
    let product = Product {
        key: GemmKey {
            m: m_i,
            n: n_i,
            k: k_i,
            trans_a: a.transpose,
            trans_b: b.transpose,
            lda,
            ldb,
            ldc,
            a_type: A::DTYPE,
            c_type: C::DTYPE,
            accumulate: epilogue.accumulate,
            align: gemm_tune::alignment(&[a_ptr, b_ptr, c_ptr]),
        },
        a: a_ptr,
        b: b_ptr,
        c: c_ptr,
        alpha,
    };
    if gemm_tune::run_tuned(device, &product, &default)? {
        return Ok(());
    }
    default(c_ptr)
}

/// Linear forward: x [M, K], weight [N, K] → y [M, N] = x · Wᵀ.
/// (cuBLAS: yᵀ [N, M] = W · xᵀ.)
pub fn linear<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    in_features: usize,
    y: &mut CudaSlice<T>,
) -> Result<()> {
    linear_into(device, x, weight, in_features, y, false)
}

/// [`linear`] into y, or added to it when `accumulate` (y += x · Wᵀ: a LoRA branch beside
/// the frozen product).
pub fn linear_into<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    in_features: usize,
    y: &mut CudaSlice<T>,
    accumulate: bool,
) -> Result<()> {
    let epilogue = Epilogue::plain(accumulate);
    linear_with(device, (x, Cols::whole(in_features)), weight, y, epilogue)
}

/// [`linear_into`] reading x [M, K] from columns of a wider buffer: y [M, N] (+)=
/// x[:, cols] · Wᵀ for W [N, cols.width] (one branch of a LoRA group's xs).
pub fn linear_cols_into<T: CudaElement>(
    device: &CudaDevice,
    (x, cols): (&CudaSlice<T>, Cols),
    weight: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    accumulate: bool,
) -> Result<()> {
    linear_with(device, (x, cols), weight, y, Epilogue::plain(accumulate))
}

/// y = alpha · x · Wᵀ, the scale applied to the f32 accumulator before y is rounded (a LoRA
/// branch's s·(x·Aᵀ) in one product).
pub fn linear_scaled<T: CudaElement>(
    device: &CudaDevice,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    in_features: usize,
    y: &mut CudaSlice<T>,
    alpha: f32,
) -> Result<()> {
    let epilogue = Epilogue {
        alpha,
        accumulate: false,
    };
    linear_with(device, (x, Cols::whole(in_features)), weight, y, epilogue)
}

fn linear_with<T: CudaElement>(
    device: &CudaDevice,
    (x, cols): (&CudaSlice<T>, Cols),
    weight: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    epilogue: Epilogue,
) -> Result<()> {
    let op = "cuda linear";
    let k = cols.width;
    let m = cols.rows(op, "x", x.len())?;
    let n = rows_of(op, "weight", weight.len(), k)?;
    check_len(op, "output", y.len(), m * n)?;
    let w = Operand::whole(weight, true, k);
    let xt = Operand {
        data: x,
        offset: cols.first,
        transpose: false,
        ld: cols.stride,
    };
    gemm(device, (n, m, k), w, xt, (y, Cols::whole(n)), epilogue)
}

/// Linear backward for the input: dy [M, N], weight [N, K] → dx [M, K] = dy · W.
/// (cuBLAS: dxᵀ [K, M] = Wᵀ · dyᵀ.)
pub fn linear_backward_input<T: CudaElement>(
    device: &CudaDevice,
    dy: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    in_features: usize,
    dx: &mut CudaSlice<T>,
) -> Result<()> {
    linear_backward_input_into(device, dy, weight, in_features, dx, false)
}

/// [`linear_backward_input`] into dx, or added to it when `accumulate` (the input gradients
/// of several products that read the same x).
pub fn linear_backward_input_into<T: CudaElement>(
    device: &CudaDevice,
    dy: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    in_features: usize,
    dx: &mut CudaSlice<T>,
    accumulate: bool,
) -> Result<()> {
    let epilogue = Epilogue::plain(accumulate);
    let dx = (dx, Cols::whole(in_features));
    linear_backward_input_with(device, dy, weight, dx, epilogue)
}

/// dx[:, cols] = alpha · dy · W for W [N, cols.width], scaled before rounding, into columns of
/// a wider buffer (a LoRA branch's s·(dy·B) in one product, beside its group's others).
pub fn linear_backward_input_scaled<T: CudaElement>(
    device: &CudaDevice,
    dy: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    dx: (&mut CudaSlice<T>, Cols),
    alpha: f32,
) -> Result<()> {
    let epilogue = Epilogue {
        alpha,
        accumulate: false,
    };
    linear_backward_input_with(device, dy, weight, dx, epilogue)
}

fn linear_backward_input_with<T: CudaElement>(
    device: &CudaDevice,
    dy: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    (dx, cols): (&mut CudaSlice<T>, Cols),
    epilogue: Epilogue,
) -> Result<()> {
    let op = "cuda linear_backward_input";
    let k = cols.width;
    let n = rows_of(op, "weight", weight.len(), k)?;
    let m = rows_of(op, "dy", dy.len(), n)?;
    if cols.rows(op, "dx", dx.len())? != m {
        return Err(crate::OpsError::Shape {
            op,
            reason: format!("dx of {} values for {m} rows of {cols:?}", dx.len()),
        });
    }
    let wt = Operand::whole(weight, false, k);
    let dyt = Operand::whole(dy, false, n);
    gemm(device, (k, m, n), wt, dyt, (dx, cols), epilogue)
}

/// Linear backward for the weight: dy [M, N], x [M, K] → dw [N, K] += dyᵀ · x (f32).
/// (cuBLAS: dWᵀ [K, N] += xᵀ · dy.)
pub fn linear_backward_weight<T: CudaElement>(
    device: &CudaDevice,
    dy: &CudaSlice<T>,
    x: &CudaSlice<T>,
    in_features: usize,
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    linear_backward_weight_cols(device, dy, (x, Cols::whole(in_features)), dw)
}

/// [`linear_backward_weight`] reading x from columns of a wider buffer: dw [N, cols.width] +=
/// dyᵀ · x[:, cols] (one branch of a LoRA group's dB = dyᵀ·xs).
pub fn linear_backward_weight_cols<T: CudaElement>(
    device: &CudaDevice,
    dy: &CudaSlice<T>,
    (x, cols): (&CudaSlice<T>, Cols),
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    let op = "cuda linear_backward_weight";
    let k = cols.width;
    let m = cols.rows(op, "x", x.len())?;
    let n = rows_of(op, "dy", dy.len(), m.max(1))?;
    check_len(op, "dw", dw.len(), n * k)?;
    let xt = Operand {
        data: x,
        offset: cols.first,
        transpose: false,
        ld: cols.stride,
    };
    let dy_op = Operand::whole(dy, true, n);
    gemm(
        device,
        (k, n, m),
        xt,
        dy_op,
        (dw, Cols::whole(k)),
        Epilogue::plain(true),
    )
}

/// One side of a batched product: `count` row-major matrices [rows, cols] in `data`, `stride`
/// elements apart from `offset` on, entering the product as stored or transposed.
#[derive(Clone, Copy)]
pub struct Strided<'a, T> {
    pub data: &'a CudaSlice<T>,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    pub transpose: bool,
}

impl<T> Strided<'_, T> {
    /// (rows, cols) of the operand as it enters the product.
    fn dims(&self) -> (usize, usize) {
        if self.transpose {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Whether `count` matrices fit in the buffer.
    fn fits(&self, count: usize) -> bool {
        count == 0
            || self.offset + (count - 1) * self.stride + self.rows * self.cols <= self.data.len()
    }
}

/// Cᵢ [m, n] = op(Aᵢ) · op(Bᵢ) (+ Cᵢ when `accumulate`) for i < count: row-major, f32 compute
/// (cublasGemmStridedBatchedEx). C's matrices are dense, `c_stride` apart from `c_offset`.
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul<A: CudaElement, C: CudaElement>(
    device: &CudaDevice,
    a: Strided<A>,
    b: Strided<A>,
    c: &mut CudaSlice<C>,
    c_offset: usize,
    c_stride: usize,
    count: usize,
    accumulate: bool,
) -> Result<()> {
    let op = "cuda batched_matmul";
    let ((m, k), (kb, n)) = (a.dims(), b.dims());
    let c_fits = count == 0 || c_offset + (count - 1) * c_stride + m * n <= c.len();
    if k != kb || !a.fits(count) || !b.fits(count) || !c_fits {
        return Err(crate::OpsError::Shape {
            op,
            reason: format!("[{m}, {k}]·[{kb}, {n}] × {count} does not fit its buffers"),
        });
    }
    if count == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let blas = handle(device)?;
    let int = |what: &'static str, v: usize| to_u32(what, v).map(|v| v as i32);
    let op_of = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
    let stream = device.stream();
    let (a_ptr, _ra) = a.data.device_ptr(stream);
    let (b_ptr, _rb) = b.data.device_ptr(stream);
    let (c_ptr, _rc) = c.device_ptr_mut(stream);
    let elem_a = std::mem::size_of::<A>() as u64;
    let elem_c = std::mem::size_of::<C>() as u64;
    // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: B comes first, each
    // operand transposed in cuBLAS's terms exactly when it is in ours, leading dimension its
    // stored row length.
    // SAFETY: `fits` checked that every matrix of A, B and C lies inside its buffer; the
    // offsets are applied in bytes to the recorded device pointers; alpha and beta are f32
    // as COMPUTE_32F requires; the handle is bound to this device's stream.
    unsafe {
        blas::gemm_strided_batched_ex(
            *blas.handle(),
            op_of(b.transpose),
            op_of(a.transpose),
            int("n", n)?,
            int("m", m)?,
            int("k", k)?,
            (&alpha) as *const f32 as *const _,
            (b_ptr + b.offset as u64 * elem_a) as *const _,
            data_type(A::DTYPE),
            int("ldb", b.cols)?,
            b.stride as i64,
            (a_ptr + a.offset as u64 * elem_a) as *const _,
            data_type(A::DTYPE),
            int("lda", a.cols)?,
            a.stride as i64,
            (&beta) as *const f32 as *const _,
            (c_ptr + c_offset as u64 * elem_c) as *mut _,
            data_type(C::DTYPE),
            int("ldc", n)?,
            c_stride as i64,
            int("count", count)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| llama_core::Error::cuda("cublasGemmStridedBatchedEx", e).into())
}
