//! The one door to the `gemm` crate: a strided f32 matrix product with its bounds checked here,
//! so that callers stay safe code.

use gemm::Parallelism;

/// A read-only matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major [rows, cols] matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major [cols, rows] matrix, without copying.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }

    /// True when every addressed element lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        last < self.data.len()
    }
}

/// A row-major matrix as a product operand, used as stored or transposed.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    /// `data` is [rows, cols] row-major and enters the product as is.
    Plain(&'a [f32], usize, usize),
    /// `data` is [cols, rows] row-major and enters the product transposed, as [rows, cols].
    Transposed(&'a [f32], usize, usize),
}

impl<'a> Operand<'a> {
    fn view(self) -> View<'a> {
        match self {
            Operand::Plain(data, rows, cols) => View::row_major(data, rows, cols),
            Operand::Transposed(data, rows, cols) => View::transposed(data, rows, cols),
        }
    }
}

/// c [M, N] (row-major) = a [M, K] · b [K, N], or c += a · b when `accumulate`. Panics if the
/// operands do not hold their stated sizes (callers own the shapes; it is an internal helper).
pub fn gemm(a: Operand, b: Operand, c: &mut [f32], accumulate: bool) {
    matmul(a.view(), b.view(), c, accumulate)
}

/// c [M, N] (row-major) = a [M, K] · b [K, N], or c += … when `accumulate`.
/// Threads: rayon's pool when the product is large enough to share.
pub(crate) fn matmul(a: View, b: View, c: &mut [f32], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.len() == m * n && a.in_bounds() && b.in_bounds(),
        "gemm_ffi::matmul: inconsistent views"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if m * n * k >= 1 << 18 && threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the assert above checks that every element the strides address lies inside a, b
    // and c (c is dense row-major [m, n]); c is exclusively borrowed and does not alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
