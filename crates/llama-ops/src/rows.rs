//! Row-parallel traversal shared by the norms and the loss: a `[N, C]` buffer is cut into tasks
//! of whole rows (at least [`TASK_ELEMS`] elements each, so threads are worth waking), each task
//! gets one f32 scratch row, and small buffers stay on the calling thread.

use rayon::prelude::*;

/// Elements per parallel task, at least.
pub(crate) const TASK_ELEMS: usize = 1 << 14;

/// Rows per task for rows of `dim` elements.
pub(crate) fn rows_per_task(dim: usize) -> usize {
    TASK_ELEMS.div_ceil(dim.max(1))
}

/// Calls `f(row_index, out_row, scratch)` for every row of `out` ([N, dim]), in parallel tasks.
pub(crate) fn for_each_row<T, F>(out: &mut [T], dim: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T], &mut [f32]) + Sync,
{
    let per_task = rows_per_task(dim);
    let task = |(t, chunk): (usize, &mut [T])| {
        let mut scratch = vec![0f32; dim];
        for (r, row) in chunk.chunks_mut(dim).enumerate() {
            f(t * per_task + r, row, &mut scratch);
        }
    };
    if out.len() <= TASK_ELEMS {
        task((0, out));
    } else {
        out.par_chunks_mut(per_task * dim)
            .enumerate()
            .for_each(task);
    }
}

/// Like [`for_each_row`], and each task also sums `acc_len` f32 values over its rows (e.g. a
/// weight gradient); the tasks' sums are added and returned.
pub(crate) fn for_each_row_sum<T, F>(out: &mut [T], dim: usize, acc_len: usize, f: F) -> Vec<f32>
where
    T: Send,
    F: Fn(usize, &mut [T], &mut [f32], &mut [f32]) + Sync,
{
    let per_task = rows_per_task(dim);
    let task = |(t, chunk): (usize, &mut [T])| {
        let mut scratch = vec![0f32; dim];
        let mut acc = vec![0f32; acc_len];
        for (r, row) in chunk.chunks_mut(dim).enumerate() {
            f(t * per_task + r, row, &mut scratch, &mut acc);
        }
        acc
    };
    let add = |mut a: Vec<f32>, b: Vec<f32>| {
        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
        a
    };
    if out.len() <= TASK_ELEMS {
        task((0, out))
    } else {
        out.par_chunks_mut(per_task * dim)
            .enumerate()
            .map(task)
            .reduce(|| vec![0f32; acc_len], add)
    }
}
