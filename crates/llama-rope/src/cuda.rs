//! The rotation on a CUDA device (`kernels/rope.cu`), over device copies of the cos/sin tables.
//! Results equal the CPU path ([`crate::apply`]) bit for bit, in f32 and in bf16.

use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use llama_core::cuda::{CudaDevice, KernelSource};
use llama_core::{bf16, Element};

use crate::cache::RopeTables;
use crate::shape::QkShape;
use crate::{Result, RopeError};

const ROPE: KernelSource = KernelSource {
    name: "rope",
    code: include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../kernels/rope.cu"
    )),
};

/// A device copy of [`RopeTables`]; re-upload when [`crate::RotaryEmbedding::generation`] moves.
pub struct DeviceTables {
    device: Arc<CudaDevice>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    half: usize,
    len: usize,
    /// The position ids of the last launch and their device copy: a training step rotates q
    /// and k at the same positions four times a layer, step after step, and a copy from
    /// pageable host memory may wait for the stream (CUDA's "API synchronization behavior").
    positions: Mutex<Option<UploadedPositions>>,
}

/// Position ids and their device copy.
type UploadedPositions = (Vec<u32>, Arc<CudaSlice<u32>>);

impl DeviceTables {
    /// Uploads `tables` to `device`.
    pub fn upload(device: &Arc<CudaDevice>, tables: &RopeTables) -> Result<DeviceTables> {
        Ok(DeviceTables {
            device: device.clone(),
            cos: device.htod(tables.cos)?,
            sin: device.htod(tables.sin)?,
            half: tables.half,
            len: tables.len,
            positions: Mutex::new(None),
        })
    }

    /// `positions` on the device: the copy of the last launch's when they are the same, else
    /// a new upload (kept for the next launch).
    fn positions_on_device(&self, positions: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        let mut cached = self
            .positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((ids, on_device)) = cached.as_ref() {
            if ids.as_slice() == positions {
                return Ok(on_device.clone());
            }
        }
        let on_device = Arc::new(self.device.htod(positions)?);
        // The kept Vec takes the new ids (decoding changes them every token).
        let mut ids = cached.take().map(|(ids, _)| ids).unwrap_or_default();
        ids.clear();
        ids.extend_from_slice(positions);
        *cached = Some((ids, on_device.clone()));
        Ok(on_device)
    }

    /// Positions covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is covered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An element type the rope kernels handle: `ROPE_SUFFIX` names their instances.
pub trait RopeElement: Element {
    const ROPE_SUFFIX: &'static str;
}
impl RopeElement for f32 {
    const ROPE_SUFFIX: &'static str = "f32";
}
impl RopeElement for bf16 {
    const ROPE_SUFFIX: &'static str = "bf16";
}

/// Rotates `x` ([batch, heads, seq, head_dim] on the tables' device) in place; `backward`
/// rotates by the negative angles. `positions` has seq or batch · seq ids.
pub fn apply<T: RopeElement>(
    x: &mut CudaSlice<T>,
    shape: QkShape,
    tables: &DeviceTables,
    positions: &[u32],
    backward: bool,
) -> Result<()> {
    shape.check(x.len(), tables.half * 2, positions, tables.len)?;
    if x.is_empty() {
        return Ok(());
    }
    let name = format!("rope_{}", T::ROPE_SUFFIX);
    let function = tables.device.function(&ROPE, &name)?;
    let (args, config) = RopeArgs::new::<T>(shape, tables, positions, backward)?;
    let mut launch = tables.device.stream().launch_builder(&function);
    launch.arg(x);
    args.push(&mut launch);
    // SAFETY: x holds rows · head_dim elements of T (checked above), the tables hold
    // len · half f32 each, every position id is below len (checked), and the kernel touches
    // only those indices.
    unsafe { launch.launch(config) }.map_err(|e| llama_core::Error::cuda(&name, e))?;
    Ok(())
}

/// The rotation of [`apply`] fused with the move between layouts, into `dst`: `to_heads`
/// reads `src` token-major [batch, seq, heads, head_dim] (as a projection writes it) and writes
/// head-major [batch, heads, seq, head_dim] (as attention reads it), else the reverse. One
/// pass where a head split and a rotation in place took two.
pub fn apply_moving<T: RopeElement>(
    src: &CudaSlice<T>,
    dst: &mut CudaSlice<T>,
    shape: QkShape,
    tables: &DeviceTables,
    positions: &[u32],
    backward: bool,
    to_heads: bool,
) -> Result<()> {
    shape.check(src.len(), tables.half * 2, positions, tables.len)?;
    shape.check(dst.len(), tables.half * 2, positions, tables.len)?;
    if src.is_empty() {
        return Ok(());
    }
    let name = format!("rope_moving_{}", T::ROPE_SUFFIX);
    let function = tables.device.function(&ROPE, &name)?;
    let (args, config) = RopeArgs::new::<T>(shape, tables, positions, backward)?;
    let to_heads = i32::from(to_heads);
    let mut launch = tables.device.stream().launch_builder(&function);
    launch.arg(src).arg(dst);
    args.push(&mut launch);
    launch.arg(&to_heads);
    // SAFETY: src and dst hold rows · head_dim elements of T each (checked above) and are
    // distinct buffers (one borrowed mutably), the tables hold len · half f32 each, every
    // position id is below len (checked), and the kernel touches only those indices.
    unsafe { launch.launch(config) }.map_err(|e| llama_core::Error::cuda(&name, e))?;
    Ok(())
}

/// The arguments both rope kernels take after their buffers.
struct RopeArgs<'a> {
    tables: &'a DeviceTables,
    positions: Arc<CudaSlice<u32>>,
    rows: usize,
    dims: [u32; 5],
    sign: f32,
}

impl<'a> RopeArgs<'a> {
    fn new<T: RopeElement>(
        shape: QkShape,
        tables: &'a DeviceTables,
        positions: &[u32],
        backward: bool,
    ) -> Result<(RopeArgs<'a>, LaunchConfig)> {
        let rows = shape.batch * shape.heads * shape.seq;
        let to_u32 = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| RopeError::Shape {
                op: "cuda apply",
                reason: format!("{what} {v} exceeds u32"),
            })
        };
        let dims = [
            to_u32(shape.heads, "heads")?,
            to_u32(shape.seq, "seq")?,
            to_u32(shape.head_dim, "head_dim")?,
            to_u32(tables.half, "half")?,
            u32::from(positions.len() != shape.seq),
        ];
        let args = RopeArgs {
            tables,
            positions: tables.positions_on_device(positions)?,
            rows,
            dims,
            sign: if backward { -1.0 } else { 1.0 },
        };
        // A thread per frequency pair, or per 16-byte pack of them where the kernel packs
        // (rope_vec: whole packs in half and head_dim; CudaSlice buffers start aligned).
        let pack = 16 / std::mem::size_of::<T>();
        let packed = tables.half.is_multiple_of(pack) && shape.head_dim.is_multiple_of(pack);
        let lanes = if packed {
            tables.half / pack
        } else {
            tables.half
        };
        Ok((args, launch_config(rows, lanes)))
    }

    /// cos, sin, positions, rows, heads, seq, head_dim, half, per_sequence, sign.
    fn push<'b>(&'b self, launch: &mut cudarc::driver::LaunchArgs<'b>) {
        launch
            .arg(&self.tables.cos)
            .arg(&self.tables.sin)
            .arg(&*self.positions)
            .arg(&self.rows);
        for d in &self.dims {
            launch.arg(d);
        }
        launch.arg(&self.sign);
    }
}

/// Threads per block.
const BLOCK_THREADS: usize = 256;
/// Blocks at most (16.7M threads fill any current GPU); beyond that each block strides over rows.
const MAX_BLOCKS: usize = 65_535;

/// threadIdx.x over a row's `lanes` (a power of two up to 128 that covers them), threadIdx.y
/// over rows, one block per BLOCK_THREADS / x rows.
fn launch_config(rows: usize, lanes: usize) -> LaunchConfig {
    let x = lanes.next_power_of_two().clamp(1, 128);
    let y = BLOCK_THREADS / x;
    LaunchConfig {
        grid_dim: (rows.div_ceil(y).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (x as u32, y as u32, 1),
        shared_mem_bytes: 0,
    }
}
