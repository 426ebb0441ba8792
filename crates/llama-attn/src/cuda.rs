//! Attention on a CUDA device (`kernels/attention.cu`): the counterparts of [`crate::forward`]
//! and [`crate::backward`] over device buffers, f32 math for f32/f16/bf16 tensors. A warp owns a
//! query row (a key row in the dK/dV pass); when there are too few query rows to fill the GPU —
//! decoding — the keys are split across warps and the partial softmaxes merged
//! (flash-decoding). Prefill in bf16 at head_dim 64 or 128 runs a tensor-core kernel instead
//! (mma.sync, double-buffered K/V tiles in shared memory), and so does the training backward
//! ([`backward_tc`], FlashAttention-2's). head_dim ≤ 256. [`CudaKvCache`] keeps a layer's keys
//! and values on the device, grown in increments like the host cache.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use llama_core::cuda::{CudaDevice, KernelSource};
use llama_ops::cuda::CudaElement;

use crate::error::{shape_error, Result};
use crate::kv_cache::CacheLayout;
use crate::shape::{AttnShape, Mask};

pub(crate) const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    code: include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../kernels/attention.cu"
    )),
};

/// Largest head_dim the kernels hold in registers (`ATT_MAX_D`).
pub const MAX_HEAD_DIM: usize = 256;
/// Warps per block.
const WARPS: usize = 8;
/// Query-row warps below which the forward splits the keys.
const SPLIT_BELOW_WARPS: usize = 4096;
/// Keys per split, at least.
const MIN_SPLIT_KEYS: usize = 64;
/// Query rows per block of the tensor-core kernel (`TC_ROWS`).
const TC_ROWS: usize = 128;
/// Fewer query rows than this go to the warp-per-row kernel.
const TC_MIN_ROWS: usize = 16;
/// Keys (or queries) per tile the tensor-core kernels stage in shared memory (`TC_KEYS`).
const TC_TILE: usize = 64;

/// Dynamic shared memory of a tensor-core kernel at `head_dim`: two bf16 matrices of a tile's
/// rows (padded by 8), double-buffered, and `floats_per_row` f32 per row and buffer. Set as the
/// function's limit too, since it passes the 48 KiB a launch gets without asking.
fn tc_shared_memory(
    f: &cudarc::driver::CudaFunction,
    head_dim: usize,
    floats_per_row: usize,
) -> Result<u32> {
    let bytes = 2 * (2 * TC_TILE * (head_dim + 8) * 2 + TC_TILE * floats_per_row * 4);
    let attr =
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    f.set_attribute(attr, bytes as i32)
        .map_err(|e| llama_core::Error::cuda("cuFuncSetAttribute", e))?;
    Ok(bytes as u32)
}

/// The kernels' `AttnDims`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnDims {
    batch: u32,
    heads: u32,
    kv_heads: u32,
    seq_q: u32,
    seq_k: u32,
    kv_stride: u32,
    head_dim: u32,
    causal: i32,
}

// SAFETY: AttnDims is #[repr(C)], eight 4-byte integers, exactly the layout of the kernels'
// `struct AttnDims`, and holds no pointers.
unsafe impl DeviceRepr for AttnDims {}

fn dims(s: &AttnShape, mask: &Mask) -> Result<AttnDims> {
    let u = |what: &'static str, v: usize| {
        u32::try_from(v).map_err(|_| crate::AttnError::Shape {
            op: "cuda",
            reason: format!("{what} = {v} exceeds 32 bits"),
        })
    };
    if s.head_dim > MAX_HEAD_DIM {
        return shape_error(
            "cuda",
            format!(
                "head_dim {} exceeds the kernels' {MAX_HEAD_DIM}",
                s.head_dim
            ),
        );
    }
    Ok(AttnDims {
        batch: u("batch", s.batch)?,
        heads: u("heads", s.heads)?,
        kv_heads: u("kv_heads", s.kv_heads)?,
        seq_q: u("seq_q", s.seq_q)?,
        seq_k: u("seq_k", s.seq_k)?,
        kv_stride: u("kv_stride", s.kv_stride)?,
        head_dim: u("head_dim", s.head_dim)?,
        causal: i32::from(mask.causal),
    })
}

/// A launch of one warp per item.
fn warps(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(WARPS).max(1) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The padding on the device (None: no padding).
fn upload_padding(device: &CudaDevice, mask: &Mask) -> Result<Option<CudaSlice<i32>>> {
    mask.padding
        .map(|p| {
            let p: Vec<i32> = p.iter().map(|&v| v.min(i32::MAX as usize) as i32).collect();
            device.htod(&p).map_err(Into::into)
        })
        .transpose()
}

fn launched<T>(kernel: &str, r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| llama_core::Error::cuda(kernel, e).into())
}

/// Key splits for `rows` query rows over `seq_k` keys: enough warps to fill the GPU.
fn splits_for(rows: usize, seq_k: usize) -> usize {
    if rows >= SPLIT_BELOW_WARPS {
        return 1;
    }
    SPLIT_BELOW_WARPS
        .div_ceil(rows.max(1))
        .min(seq_k.div_ceil(MIN_SPLIT_KEYS))
        .max(1)
}

/// Forward: O [B, H, Tq, D] and L [B, H, Tq] on the device (see [`crate::forward`]).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: CudaElement>(
    device: &CudaDevice,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    s: &AttnShape,
    mask: &Mask,
    out: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    s.check_forward(
        "cuda forward",
        q.len(),
        k.len(),
        v.len(),
        out.len(),
        lse.len(),
    )?;
    mask.check("cuda forward", s)?;
    let rows = s.q_rows();
    if rows == 0 {
        return Ok(());
    }
    let d = dims(s, mask)?;
    let pad = upload_padding(device, mask)?;
    let (null, scale) = (0u64, 1.0 / (s.head_dim as f32).sqrt());
    // Prefill in bf16 at head_dim 64 or 128: the tensor-core kernel, a block per 128 query rows.
    if T::SUFFIX == "bf16" && matches!(s.head_dim, 64 | 128) && s.seq_q >= TC_MIN_ROWS {
        let name = format!("attn_forward_tc{}_bf16", s.head_dim);
        let f = device.function(&ATTENTION, &name)?;
        let blocks = s.batch * s.heads * s.seq_q.div_ceil(TC_ROWS);
        let mut launch = device.stream().launch_builder(&f);
        launch.arg(q).arg(k).arg(v);
        match &pad {
            Some(p) => launch.arg(p),
            None => launch.arg(&null),
        };
        launch.arg(out).arg(lse).arg(&d).arg(&scale);
        let config = LaunchConfig {
            grid_dim: (u32::try_from(blocks).unwrap_or(u32::MAX), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tc_shared_memory(&f, s.head_dim, 0)?,
        };
        // SAFETY: as for the warp kernel below; T is bf16 (the kernel's bf16_t), head_dim is the
        // kernel's D, each block writes only the rows of its (b, h) tile below seq_q, and the
        // dynamic shared memory is the size the kernel carves (tc_shared_memory).
        return launched(&name, unsafe { launch.launch(config) });
    }
    let splits = splits_for(rows, s.seq_k);
    let split_len = s.seq_k.div_ceil(splits).max(1) as u32;
    let splits_u = splits as u32;
    // With one split the kernel writes O and L itself and the partial buffers stay null.
    let mut parts = if splits > 1 {
        Some((
            device.zeros::<f32>(2 * rows * splits)?,
            device.zeros::<f32>(rows * splits * s.head_dim)?,
        ))
    } else {
        None
    };
    let name = format!("attn_forward_{}", T::SUFFIX);
    let f = device.function(&ATTENTION, &name)?;
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(q).arg(k).arg(v);
    match &pad {
        Some(p) => launch.arg(p),
        None => launch.arg(&null),
    };
    launch.arg(&mut *out).arg(&mut *lse);
    match &mut parts {
        Some((ml, o)) => launch.arg(ml).arg(o),
        None => launch.arg(&null).arg(&null),
    };
    launch.arg(&d).arg(&splits_u).arg(&split_len).arg(&scale);
    // SAFETY: q, k, v, out and lse hold the sizes `s` describes (checked); pad holds one entry
    // per sequence or is null; the partial buffers hold rows · splits entries when splits > 1
    // and are only touched then; warps past rows · splits return at once.
    launched(&name, unsafe { launch.launch(warps(rows * splits)) })?;
    if let Some((part_ml, part_o)) = &parts {
        let name = format!("attn_merge_{}", T::SUFFIX);
        let f = device.function(&ATTENTION, &name)?;
        let dim = s.head_dim as u32;
        let mut launch = device.stream().launch_builder(&f);
        launch
            .arg(part_ml)
            .arg(part_o)
            .arg(out)
            .arg(lse)
            .arg(&rows)
            .arg(&splits_u)
            .arg(&dim);
        // SAFETY: the partials of rows · splits slots written above; out and lse as checked.
        launched(&name, unsafe { launch.launch(warps(rows)) })?;
    }
    Ok(())
}

/// The attention output O as a backward reads it (only for Δᵢ = dOᵢ·Oᵢ): in heads
/// [B, H, T, D], as [`forward`] writes it, or merged [B, T, H·D], as a layer passes it on to its
/// output projection (which saves keeping both).
#[derive(Clone, Copy)]
pub enum AttnOutput<'a, T> {
    Heads(&'a CudaSlice<T>),
    Merged(&'a CudaSlice<T>),
}

impl<'a, T> AttnOutput<'a, T> {
    fn values(self) -> &'a CudaSlice<T> {
        match self {
            AttnOutput::Heads(o) | AttnOutput::Merged(o) => o,
        }
    }
}

/// Δ = rowsum(dO ∘ O) for each query row of `s` (at least one value is allocated); dO in heads.
fn row_deltas<T: CudaElement>(
    device: &CudaDevice,
    out: AttnOutput<'_, T>,
    dout: &CudaSlice<T>,
    s: &AttnShape,
) -> Result<CudaSlice<f32>> {
    let rows = s.q_rows();
    let mut delta = device.zeros::<f32>(rows.max(1))?;
    if rows > 0 {
        let name = format!("attn_delta_{}", T::SUFFIX);
        let f = device.function(&ATTENTION, &name)?;
        let mut launch = device.stream().launch_builder(&f);
        let merged_heads = match out {
            AttnOutput::Heads(_) => 0u32,
            AttnOutput::Merged(_) => s.heads as u32,
        };
        let (dim, seq) = (s.head_dim as u32, s.seq_q as u32);
        launch
            .arg(out.values())
            .arg(dout)
            .arg(&mut delta)
            .arg(&rows)
            .arg(&dim)
            .arg(&merged_heads)
            .arg(&seq);
        // SAFETY: the callers checked that out and dout hold rows · D values (rows = B·H·T, in
        // either of out's layouts); delta holds rows.
        launched(&name, unsafe { launch.launch(warps(rows)) })?;
    }
    Ok(delta)
}

/// The sizes of a backward's buffers against `s` (q, k, v, O, dO, dQ, dK, dV, then L).
fn check_buffers<T>(
    op: &'static str,
    s: &AttnShape,
    buffers: [&CudaSlice<T>; 8],
    lse: &CudaSlice<f32>,
) -> Result<()> {
    let [q, k, v, out, dout, dq, dk, dv] = buffers.map(CudaSlice::len);
    s.check_backward(op, [q, k, v, out, dout, dq, lse.len(), dk, dv])
}

/// Backward: dQ, dK, dV on the device from the forward's inputs, O, L and dO (see
/// [`crate::backward`]); deterministic (no atomics): one warp per query for dQ, one per key
/// for dK and dV.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: CudaElement>(
    device: &CudaDevice,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    out: AttnOutput<'_, T>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<T>,
    s: &AttnShape,
    mask: &Mask,
    dq: &mut CudaSlice<T>,
    dk: &mut CudaSlice<T>,
    dv: &mut CudaSlice<T>,
) -> Result<()> {
    check_buffers(
        "cuda backward",
        s,
        [q, k, v, out.values(), dout, &*dq, &*dk, &*dv],
        lse,
    )?;
    mask.check("cuda backward", s)?;
    let rows = s.q_rows();
    let d = dims(s, mask)?;
    let pad = upload_padding(device, mask)?;
    let (null, scale) = (0u64, 1.0 / (s.head_dim as f32).sqrt());
    let delta = row_deltas(device, out, dout, s)?;
    if rows > 0 {
        let name = format!("attn_dq_{}", T::SUFFIX);
        let f = device.function(&ATTENTION, &name)?;
        let mut launch = device.stream().launch_builder(&f);
        launch.arg(q).arg(k).arg(v).arg(dout).arg(lse).arg(&delta);
        match &pad {
            Some(p) => launch.arg(p),
            None => launch.arg(&null),
        };
        launch.arg(dq).arg(&d).arg(&scale);
        // SAFETY: sizes as checked above; one warp per query row.
        launched(&name, unsafe { launch.launch(warps(rows)) })?;
    }
    let keys = s.batch * s.kv_heads * s.kv_stride;
    if keys > 0 {
        let name = format!("attn_dkv_{}", T::SUFFIX);
        let f = device.function(&ATTENTION, &name)?;
        let mut launch = device.stream().launch_builder(&f);
        launch.arg(q).arg(k).arg(v).arg(dout).arg(lse).arg(&delta);
        match &pad {
            Some(p) => launch.arg(p),
            None => launch.arg(&null),
        };
        launch.arg(dk).arg(dv).arg(&d).arg(&scale);
        // SAFETY: sizes as checked above; one warp per key row, every row of dK and dV written.
        launched(&name, unsafe { launch.launch(warps(keys)) })?;
    }
    Ok(())
}

/// Whether [`backward_tc`] takes `s` in element type T: bf16 causal self-attention at head_dim
/// 64 or 128.
pub fn tensor_core_backward<T: CudaElement>(s: &AttnShape) -> bool {
    T::SUFFIX == "bf16"
        && matches!(s.head_dim, 64 | 128)
        && s.seq_k == s.seq_q
        && s.kv_stride == s.seq_q
}

/// The backward of causal self-attention (no padding) as FlashAttention-2 computes it on the
/// tensor cores (`attn_dq_tc*` and `attn_dkv_tc*` in attention.cu): the probabilities are
/// recomputed a tile at a time from L and never stored, so it needs no scratch beyond Δ. Same
/// inputs and outputs as [`backward`], each of dq, dk, dv written whole (their contents before
/// are never read); shapes [`tensor_core_backward`] accepts only.
#[allow(clippy::too_many_arguments)]
pub fn backward_tc<T: CudaElement>(
    device: &CudaDevice,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    out: AttnOutput<'_, T>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<T>,
    s: &AttnShape,
    dq: &mut CudaSlice<T>,
    dk: &mut CudaSlice<T>,
    dv: &mut CudaSlice<T>,
) -> Result<()> {
    check_buffers(
        "cuda backward_tc",
        s,
        [q, k, v, out.values(), dout, &*dq, &*dk, &*dv],
        lse,
    )?;
    if !tensor_core_backward::<T>(s) {
        return shape_error(
            "cuda backward_tc",
            format!(
                "bf16 self-attention at head_dim 64 or 128 only, not {} at {s:?}",
                T::SUFFIX
            ),
        );
    }
    let rows = s.q_rows();
    if rows == 0 {
        return Ok(());
    }
    let mask = Mask {
        causal: true,
        padding: None,
    };
    let dims = dims(s, &mask)?;
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let delta = row_deltas(device, out, dout, s)?;
    let tiles = s.seq_q.div_ceil(TC_ROWS);
    let blocks = |pairs: usize, shared_mem_bytes: u32| LaunchConfig {
        grid_dim: (u32::try_from(pairs * tiles).unwrap_or(u32::MAX), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes,
    };
    let name = format!("attn_dq_tc{}_bf16", s.head_dim);
    let f = device.function(&ATTENTION, &name)?;
    let mut launch = device.stream().launch_builder(&f);
    launch.arg(q).arg(k).arg(v).arg(dout).arg(lse).arg(&delta);
    launch.arg(dq).arg(&dims).arg(&scale);
    let shared = tc_shared_memory(&f, s.head_dim, 0)?;
    // SAFETY: sizes as checked above (self-attention: T queries and keys); T is bf16 (the
    // kernel's bf16_t) at the kernel's head_dim; a block per 128 query rows of each (b, h), rows
    // past T not written; `shared` bytes of dynamic shared memory, as the kernel carves them.
    launched(&name, unsafe {
        launch.launch(blocks(s.batch * s.heads, shared))
    })?;
    // At head_dim 128 dV and dK are two passes (the accumulators of both overflow the registers).
    let passes: &[&str] = if s.head_dim == 64 {
        &["attn_dkv"]
    } else {
        &["attn_dv", "attn_dk"]
    };
    for pass in passes {
        let name = format!("{pass}_tc{}_bf16", s.head_dim);
        let f = device.function(&ATTENTION, &name)?;
        let mut launch = device.stream().launch_builder(&f);
        launch.arg(q).arg(k).arg(v).arg(dout).arg(lse).arg(&delta);
        launch.arg(&mut *dk).arg(&mut *dv).arg(&dims).arg(&scale);
        let shared = tc_shared_memory(&f, s.head_dim, 2)?;
        // SAFETY: as for attn_dq_tc; a block per 128 keys of each (b, kv head) writes those rows
        // of dK and/or dV below T.
        launched(&name, unsafe {
            launch.launch(blocks(s.batch * s.kv_heads, shared))
        })?;
    }
    Ok(())
}

/// Matrices [rows, cols] of `data`, `stride` apart from `offset` on, as stored.
fn strided<T>(
    data: &CudaSlice<T>,
    offset: usize,
    (rows, cols): (usize, usize),
    stride: usize,
) -> llama_ops::cuda::Strided<'_, T> {
    llama_ops::cuda::Strided {
        data,
        offset,
        rows,
        cols,
        stride,
        transpose: false,
    }
}

/// The same matrices, transposed in the product.
fn transposed<T>(m: llama_ops::cuda::Strided<'_, T>) -> llama_ops::cuda::Strided<'_, T> {
    llama_ops::cuda::Strided {
        transpose: true,
        ..m
    }
}

/// The kernels' `TileDims`: a tile of query rows of one head of the group, for `count`
/// (sequence, KV head) pairs, against keys 0..width.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct TileDims {
    first: u64,
    count: u32,
    pair_rows: u32,
    head_row: u32,
    i0: u32,
    tile: u32,
    width: u32,
}

// SAFETY: TileDims is #[repr(C)], a u64 and six u32, exactly the layout of the kernels'
// `struct TileDims` (size_t and six unsigned), and holds no pointers.
unsafe impl DeviceRepr for TileDims {}

/// Scores per block of [`backward_gemm`] by default: 64 M f32 (256 MB) at a time.
pub const GEMM_BACKWARD_SCORES: usize = 1 << 26;

/// Query rows per tile of [`backward_gemm`]: tile i0.. needs keys 0..i0 + tile only, so the
/// products skip most of the masked half of the scores.
const QUERY_TILE: usize = 256;

/// The backward of causal self-attention (no padding, seq_q = seq_k) through cuBLAS batched
/// products on the tensor cores. For a block of (sequence, KV head) pairs at a time, each
/// head j of the pair's group and each tile of its query rows i0..i0 + tile (keys 0..width,
/// width = i0 + tile):
///   S = Q Kᵀ (f32), P = exp(scale·S − L) causal, dV += Pᵀ dO, dP = dO Vᵀ,
///   dS = scale · P ∘ (dP − Δ), dQ = dS K, dK += dSᵀ Q.
/// Same inputs and outputs as [`backward`]; scratch of about `block_scores` f32 and as many T
/// (at least one pair's tile · T).
#[allow(clippy::too_many_arguments)]
pub fn backward_gemm<T: CudaElement>(
    device: &CudaDevice,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    out: AttnOutput<'_, T>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<T>,
    s: &AttnShape,
    dq: &mut CudaSlice<T>,
    dk: &mut CudaSlice<T>,
    dv: &mut CudaSlice<T>,
    block_scores: usize,
) -> Result<()> {
    use llama_ops::cuda::batched_matmul;
    check_buffers(
        "cuda backward_gemm",
        s,
        [q, k, v, out.values(), dout, &*dq, &*dk, &*dv],
        lse,
    )?;
    let (t, d, group) = (s.seq_q, s.head_dim, s.group());
    if s.seq_k != t || s.kv_stride != t {
        return shape_error(
            "cuda backward_gemm",
            format!("self-attention only: {t} queries, {} keys", s.seq_k),
        );
    }
    let rows = s.q_rows();
    if rows == 0 {
        return Ok(());
    }
    let scale = 1.0 / (d as f32).sqrt();
    let delta = row_deltas(device, out, dout, s)?;
    let zero = |x: &mut CudaSlice<T>| {
        device
            .stream()
            .memset_zeros(x)
            .map_err(|e| llama_core::Error::cuda("memset", e))
    };
    zero(dk)?;
    zero(dv)?;
    let u32_of = |v: usize| v as u32;
    let (pairs, pair_rows, max_tile) = (s.batch * s.kv_heads, group * t, QUERY_TILE.min(t));
    let per_block = (block_scores / (max_tile * t)).clamp(1, pairs);
    let mut scores = device.zeros::<f32>(per_block * max_tile * t)?;
    let mut probs = device.zeros::<T>(per_block * max_tile * t)?;
    let kernel = |name: &str| device.function(&ATTENTION, &format!("{name}_{}", T::SUFFIX));
    for first in (0..pairs).step_by(per_block) {
        let count = per_block.min(pairs - first);
        let kv_at = first * t * d;
        for j in 0..group {
            for i0 in (0..t).step_by(max_tile) {
                let (tile, width) = (max_tile.min(t - i0), (i0 + max_tile).min(t));
                let q_at = (first * pair_rows + j * t + i0) * d;
                let q_op = strided(q, q_at, (tile, d), pair_rows * d);
                let do_op = strided(dout, q_at, (tile, d), pair_rows * d);
                let (k_op, v_op) = (
                    strided(k, kv_at, (width, d), t * d),
                    strided(v, kv_at, (width, d), t * d),
                );
                let tile_scores = tile * width;
                let dims = TileDims {
                    first: first as u64,
                    count: u32_of(count),
                    pair_rows: u32_of(pair_rows),
                    head_row: u32_of(j * t),
                    i0: u32_of(i0),
                    tile: u32_of(tile),
                    width: u32_of(width),
                };
                let grid = LaunchConfig {
                    grid_dim: (
                        (count * tile_scores).div_ceil(256).clamp(1, 1 << 20) as u32,
                        1,
                        1,
                    ),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // S = Q Kᵀ, then P
                batched_matmul(
                    device,
                    q_op,
                    transposed(k_op),
                    &mut scores,
                    0,
                    tile_scores,
                    count,
                    false,
                )?;
                let f = kernel("attn_probs")?;
                let mut launch = device.stream().launch_builder(&f);
                launch
                    .arg(&scores)
                    .arg(lse)
                    .arg(&mut probs)
                    .arg(&dims)
                    .arg(&scale);
                // SAFETY: scores and probs hold count · tile · width values (per_block ≥ count,
                // max_tile ≥ tile, T ≥ width); every logsumexp row the tile names exists.
                launched("attn_probs", unsafe { launch.launch(grid) })?;
                // dV += Pᵀ dO, dP = dO Vᵀ
                let p_op = strided(&probs, 0, (tile, width), tile_scores);
                batched_matmul(
                    device,
                    transposed(p_op),
                    do_op,
                    dv,
                    kv_at,
                    t * d,
                    count,
                    true,
                )?;
                batched_matmul(
                    device,
                    do_op,
                    transposed(v_op),
                    &mut scores,
                    0,
                    tile_scores,
                    count,
                    false,
                )?;
                let f = kernel("attn_dscores")?;
                let mut launch = device.stream().launch_builder(&f);
                launch
                    .arg(&mut probs)
                    .arg(&scores)
                    .arg(&delta)
                    .arg(&dims)
                    .arg(&scale);
                // SAFETY: as for attn_probs; delta covers every row.
                launched("attn_dscores", unsafe { launch.launch(grid) })?;
                // dQ = dS K, dK += dSᵀ Q
                let ds_op = strided(&probs, 0, (tile, width), tile_scores);
                batched_matmul(device, ds_op, k_op, dq, q_at, pair_rows * d, count, false)?;
                batched_matmul(
                    device,
                    transposed(ds_op),
                    q_op,
                    dk,
                    kv_at,
                    t * d,
                    count,
                    true,
                )?;
            }
        }
    }
    Ok(())
}

/// A KV cache in device memory: the same layout and growth policy as [`crate::KvCache`]
/// (through [`CacheLayout`]), its keys and values in T; appends and growth are kernel copies.
pub struct CudaKvCache<T: CudaElement> {
    layout: CacheLayout,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
}

impl<T: CudaElement> std::ops::Deref for CudaKvCache<T> {
    type Target = CacheLayout;
    fn deref(&self) -> &CacheLayout {
        &self.layout
    }
}

impl<T: CudaElement> std::ops::DerefMut for CudaKvCache<T> {
    fn deref_mut(&mut self) -> &mut CacheLayout {
        &mut self.layout
    }
}

impl<T: CudaElement> CudaKvCache<T> {
    /// An empty cache on `device` (see [`crate::KvCache::new`]).
    pub fn new(
        device: &CudaDevice,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        increment: usize,
        max_len: usize,
    ) -> Result<Self> {
        let layout = CacheLayout::new(batch, kv_heads, head_dim, capacity, increment, max_len)?;
        let size = layout.elements(capacity).max(1);
        Ok(CudaKvCache {
            k: device.zeros(size)?,
            v: device.zeros(size)?,
            layout,
        })
    }

    /// Keys, [B, Hkv, capacity, D].
    pub fn keys(&self) -> &CudaSlice<T> {
        &self.k
    }

    /// Values, [B, Hkv, capacity, D].
    pub fn values(&self) -> &CudaSlice<T> {
        &self.v
    }

    /// Device bytes held by keys and values.
    pub fn memory_bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<T>()
    }

    /// Appends `tokens` positions: k_new and v_new are [B, Hkv, tokens, D] on the device.
    pub fn append(
        &mut self,
        device: &CudaDevice,
        k_new: &CudaSlice<T>,
        v_new: &CudaSlice<T>,
        tokens: usize,
    ) -> Result<()> {
        if let Some(capacity) = self.layout.plan_append(tokens, k_new.len(), v_new.len())? {
            let mut k = device.zeros::<T>(self.layout.elements(capacity))?;
            let mut v = device.zeros::<T>(self.layout.elements(capacity))?;
            let (len, old) = (self.layout.len, self.layout.capacity);
            copy(device, &self.layout, &self.k, &mut k, len, old, capacity, 0)?;
            copy(device, &self.layout, &self.v, &mut v, len, old, capacity, 0)?;
            (self.k, self.v) = (k, v);
            self.layout.grown(capacity);
        }
        let (len, cap) = (self.layout.len, self.layout.capacity);
        copy(
            device,
            &self.layout,
            k_new,
            &mut self.k,
            tokens,
            tokens,
            cap,
            len,
        )?;
        copy(
            device,
            &self.layout,
            v_new,
            &mut self.v,
            tokens,
            tokens,
            cap,
            len,
        )?;
        self.layout.len += tokens;
        Ok(())
    }
}

/// `count` positions of every slab of `src` (stride `src_stride`) into `dst` (stride
/// `dst_stride`) from position `at` on.
#[allow(clippy::too_many_arguments)]
fn copy<T: CudaElement>(
    device: &CudaDevice,
    layout: &CacheLayout,
    src: &CudaSlice<T>,
    dst: &mut CudaSlice<T>,
    count: usize,
    src_stride: usize,
    dst_stride: usize,
    at: usize,
) -> Result<()> {
    let slabs = layout.batch * layout.kv_heads;
    let n = slabs * count * layout.head_dim;
    if n == 0 {
        return Ok(());
    }
    let name = format!("kv_copy_{}", T::SUFFIX);
    let f = device.function(&ATTENTION, &name)?;
    let u = |what: &'static str, v: usize| {
        u32::try_from(v).map_err(|_| {
            crate::AttnError::Cache(format!("{what} = {v} exceeds the kernels' 32 bits"))
        })
    };
    let (count, src_stride, dst_stride, at, d) = (
        u("tokens", count)?,
        u("stride", src_stride)?,
        u("capacity", dst_stride)?,
        u("position", at)?,
        u("head_dim", layout.head_dim)?,
    );
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(src)
        .arg(dst)
        .arg(&slabs)
        .arg(&count)
        .arg(&src_stride)
        .arg(&dst_stride)
        .arg(&at)
        .arg(&d);
    let config = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: src holds slabs · src_stride · D elements of which the first `count` positions per
    // slab are read (plan_append checked the new tokens' size; a growth reads the filled
    // positions of the old allocation), and dst holds slabs · dst_stride · D with
    // at + count ≤ dst_stride (the capacity was grown to fit first).
    launched(&name, unsafe { launch.launch(config) })
}
