//! Cross entropy on CUDA (`kernels/cross_entropy.cu`): the counterpart of `crate::loss`.
//! Blocks of (row, vocabulary chunk) each take their chunk's logsumexp; a second kernel merges
//! the chunks of a row and forms its loss, left on the device; [`CudaCrossEntropy::loss`] sums
//! the per-row losses (one value per token) on the host in f64, the only wait for the device.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use llama_core::cuda::{CudaDevice, KernelSource};

use super::{alloc, grid_for, kernel_source, launched, to_u32, typed_kernel, CudaElement};
use crate::error::{OpsError, Result};
use crate::loss::{check_labels, CrossEntropyOptions};

const CROSS_ENTROPY: KernelSource = kernel_source!("cross_entropy");

/// The forward's results on the device, kept for the backward.
pub struct CudaCrossEntropy {
    /// Rows whose label is not the ignore index.
    pub n_valid: usize,
    /// logsumexp per row (0 for ignored rows).
    pub logsumexp: CudaSlice<f32>,
    /// Each row's loss (0 for ignored rows).
    row_loss: CudaSlice<f32>,
    labels: CudaSlice<i64>,
}

impl CudaCrossEntropy {
    /// Σ of the rows' losses (f64, summed on the host; waits for the device).
    pub fn loss_sum(&self, device: &CudaDevice) -> Result<f64> {
        if self.n_valid == 0 {
            return Ok(0.0);
        }
        Ok(device.dtoh(&self.row_loss)?.iter().map(|&l| l as f64).sum())
    }

    /// Each row's loss (0 for ignored rows) on the device, for a caller that gathers the rows
    /// of several chunks and reads them back once.
    pub fn row_losses(&self) -> &CudaSlice<f32> {
        &self.row_loss
    }

    /// Mean loss over counted rows (0 when none count); waits for the device.
    pub fn loss(&self, device: &CudaDevice) -> Result<f32> {
        let sum = self.loss_sum(device)?;
        Ok(if self.n_valid == 0 {
            0.0
        } else {
            (sum / self.n_valid as f64) as f32
        })
    }
}

/// (scale, cap) as the kernels take them: scale 1 and cap 0 when off.
fn transform_args(opts: &CrossEntropyOptions) -> (f32, f32) {
    (opts.logit_scale.unwrap_or(1.0), opts.softcap.unwrap_or(0.0))
}

/// Cross entropy of logits [N, V] (on the device) against labels [N] (host; checked, uploaded),
/// queued on the device's stream without waiting for it.
pub fn cross_entropy<T: CudaElement>(
    device: &CudaDevice,
    logits: &CudaSlice<T>,
    labels: &[i64],
    opts: &CrossEntropyOptions,
) -> Result<CudaCrossEntropy> {
    let vocab = check_labels("cuda cross_entropy", logits.len(), labels, opts)?;
    let rows = labels.len();
    let n_valid = labels.iter().filter(|&&l| l != opts.ignore_index).count();
    let labels_dev = device.htod(labels)?;
    let mut lse = device.zeros::<f32>(rows.max(1))?;
    if rows == 0 || n_valid == 0 {
        return Ok(CudaCrossEntropy {
            n_valid,
            logsumexp: lse,
            row_loss: device.zeros::<f32>(rows.max(1))?,
            labels: labels_dev,
        });
    }
    let chunks = vocab.div_ceil(opts.chunk);
    let (vocab_u, chunk_u, chunks_u) = (
        to_u32("vocab", vocab)?,
        to_u32("chunk", opts.chunk.min(vocab))?,
        to_u32("chunks", chunks)?,
    );
    let (scale, cap) = transform_args(opts);
    let mut chunk_lse = alloc::<f32>(device, rows * chunks)?;
    let (f, name) = typed_kernel::<T>(device, &CROSS_ENTROPY, "ce_chunk_lse")?;
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(logits)
        .arg(&labels_dev)
        .arg(&mut chunk_lse)
        .arg(&vocab_u)
        .arg(&chunk_u)
        .arg(&opts.ignore_index)
        .arg(&scale)
        .arg(&cap);
    let config = LaunchConfig {
        grid_dim: (to_u32("rows", rows)?, chunks_u, 1),
        block_dim: (super::BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: logits hold rows · vocab elements, labels rows ids in range (checked), chunk_lse
    // rows · chunks values; ignored rows write nothing and are not read for them below.
    launched(&name, unsafe { launch.launch(config) })?;

    let mut row_loss = alloc::<f32>(device, rows)?;
    let (f, name) = typed_kernel::<T>(device, &CROSS_ENTROPY, "ce_combine")?;
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(logits)
        .arg(&labels_dev)
        .arg(&chunk_lse)
        .arg(&mut lse)
        .arg(&mut row_loss)
        .arg(&rows)
        .arg(&vocab_u)
        .arg(&chunks_u)
        .arg(&opts.ignore_index)
        .arg(&scale)
        .arg(&cap);
    // SAFETY: as above; lse and row_loss hold rows values and are written for every row.
    launched(&name, unsafe { launch.launch(grid_for(rows)) })?;
    Ok(CudaCrossEntropy {
        n_valid,
        logsumexp: lse,
        row_loss,
        labels: labels_dev,
    })
}

/// The gradient d(dloss · loss)/d(logits), written over `logits` (ignored rows get 0).
pub fn cross_entropy_backward<T: CudaElement>(
    device: &CudaDevice,
    logits: &mut CudaSlice<T>,
    forward: &CudaCrossEntropy,
    dloss: f32,
    opts: &CrossEntropyOptions,
) -> Result<()> {
    opts.validate("cuda cross_entropy_backward")?;
    let rows = forward.labels.len();
    if rows == 0 || !logits.len().is_multiple_of(rows) {
        return Err(OpsError::Shape {
            op: "cuda cross_entropy_backward",
            reason: format!(
                "logits hold {} elements, not the forward's {rows} rows",
                logits.len()
            ),
        });
    }
    let vocab = to_u32("vocab", logits.len() / rows)?;
    let coef = if forward.n_valid == 0 {
        0.0
    } else {
        dloss / forward.n_valid as f32
    };
    let (scale, cap) = transform_args(opts);
    let (f, name) = typed_kernel::<T>(device, &CROSS_ENTROPY, "ce_backward")?;
    let n = logits.len();
    let mut launch = device.stream().launch_builder(&f);
    launch
        .arg(logits)
        .arg(&forward.labels)
        .arg(&forward.logsumexp)
        .arg(&rows)
        .arg(&vocab)
        .arg(&opts.ignore_index)
        .arg(&scale)
        .arg(&cap)
        .arg(&coef);
    // Columns in x (enough blocks for a row of packs), rows striding in y.
    let config = LaunchConfig {
        grid_dim: (
            (n / rows)
                .div_ceil(8 * super::BLOCK as usize)
                .clamp(1, 1024) as u32,
            rows.clamp(1, 65_535) as u32,
            1,
        ),
        block_dim: (super::BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: logits hold rows · vocab elements; labels and logsumexp rows values, labels in
    // range (checked by the forward).
    launched(&name, unsafe { launch.launch(config) })
}
