//! cuBLAS algorithm choice by timing, for the large dense products of `matmul.rs`.
//!
//! `cublasGemmEx` runs cublasLt's first heuristic candidate. At the training step's frozen
//! products a later candidate is often 10–16% faster (docs/performance.md, "the cuBLAS
//! algorithm choice"), so the first product of each shape of at least [`MIN_TUNED_MACS`]
//! multiply-adds times `cublasGemmEx` against cublasLt's first [`CANDIDATES`] candidates (for
//! its operands' alignment) on its own operands and keeps a candidate only when it beats the
//! default by [`MIN_GAIN`].
//!
//! The choice is kept for the process and in `$FASTLLAMA_CACHE/gemm/` under the GPU's name and
//! the cublasLt version, so every later run on the same GPU and library runs the same
//! algorithm: products stay bit-identical from run to run (a resumed training run repeats the
//! uninterrupted one's losses; two processes that tuned the same shape separately, with no
//! cache between them, may differ in the last bit). `FASTLLAMA_GEMM_TUNING=0` runs
//! `cublasGemmEx` everywhere.

use std::collections::hash_map::{Entry, HashMap};
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, DevicePtr};
use llama_core::cuda::CudaDevice;
use llama_core::{cache_dir, fnv1a64, write_atomic, DType};

use super::per_device;
use crate::error::Result;

/// Environment variable that turns tuning off ("0", "off" or "false").
const TUNING_ENV: &str = "FASTLLAMA_GEMM_TUNING";
/// Products below this many multiply-adds (m·n·k) keep `cublasGemmEx`'s choice. The frozen
/// products of a training step are 2^33 and more; tuning the rank-16 LoRA products too (from
/// 2^28) moved neither Llama-3.2-1B's nor Llama-3-8B's step beyond the noise on an H200
/// (docs/performance.md), so they keep the default.
const MIN_TUNED_MACS: u64 = 1 << 32;
/// The most shapes a device tunes and its file keeps: a training run has a few dozen, but
/// prefills of prompts of every length would add some for each length.
const MAX_SHAPES: usize = 1024;
/// How many of cublasLt's heuristic candidates are timed.
const CANDIDATES: usize = 8;
/// A candidate replaces the default only when at least this much faster (timing noise is ~1%).
const MIN_GAIN: f32 = 0.03;
/// Each timing: rounds over all candidates, each round a warm-up and `REPEATS` timed runs.
const ROUNDS: usize = 2;
const REPEATS: usize = 4;
/// cublasLt's workspace: NVIDIA's recommendation for Hopper (32 MiB).
const WORKSPACE_BYTES: usize = 32 << 20;
/// The most pointer alignment a key records (cublasLt's heuristics' default assumption), and the
/// least a tuned product needs (a tensor-core load of 8 bf16 values).
const MAX_ALIGNMENT: u64 = 256;
const MIN_ALIGNMENT: u64 = 16;

/// A column-major product C [m, n] = alpha · op(A) · op(B) + beta · C, as far as its
/// algorithm goes: sizes, layouts, element types and whether it adds to C.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct GemmKey {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: u32,
    pub ldb: u32,
    pub ldc: u32,
    pub a_type: DType,
    pub c_type: DType,
    pub accumulate: bool,
    /// The operands' alignment in bytes: the largest power of two, up to 256, that divides
    /// every one of their addresses ([`alignment`]).
    pub align: u16,
}

/// The largest power of two up to 256 that divides every address.
pub(super) fn alignment(addresses: &[u64]) -> u16 {
    let joined = addresses.iter().fold(MAX_ALIGNMENT, |acc, a| acc | a);
    1 << joined.trailing_zeros()
}

/// One product to run: its key, the operands' device addresses and its scalars.
pub(super) struct Product {
    pub key: GemmKey,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub alpha: f32,
}

impl Product {
    fn beta(&self) -> f32 {
        if self.key.accumulate {
            1.0
        } else {
            0.0
        }
    }

    fn worth_tuning(&self) -> bool {
        let key = &self.key;
        let macs = u64::from(key.m) * u64::from(key.n) * u64::from(key.k);
        macs >= MIN_TUNED_MACS && u64::from(key.align) >= MIN_ALIGNMENT
    }
}

/// What a tuned shape runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    /// `cublasGemmEx`, as untuned shapes do.
    Default,
    /// cublasLt with this algorithm.
    Algo(sys::cublasLtMatmulAlgo_t),
}

/// Runs `product` through its tuned algorithm, tuning its shape first if it has none yet.
/// `Ok(false)` when the caller should run `cublasGemmEx` itself: tuning is off, the product
/// is small or unaligned, or the default won. `default(c)` runs `cublasGemmEx` into the
/// C at address `c` (the tuner times it on a scratch C when the product adds to its C).
pub(super) fn run_tuned(
    device: &CudaDevice,
    product: &Product,
    default: &dyn Fn(u64) -> Result<()>,
) -> Result<bool> {
    if !tuning_enabled() || !product.worth_tuning() {
        return Ok(false);
    }
    let tuner = tuner(device)?;
    let mut tuner = tuner.lock().unwrap_or_else(|p| p.into_inner());
    match tuner.choice(device, product, default)? {
        Choice::Default => Ok(false),
        Choice::Algo(algo) => {
            tuner.run_planned(device, &algo, product)?;
            Ok(true)
        }
    }
}

/// Unless turned off by [`TUNING_ENV`] or without cublasLt (which cuBLAS itself links, but
/// whose absence would otherwise panic in the loader).
fn tuning_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let value = std::env::var(TUNING_ENV).unwrap_or_default();
        // SAFETY: only dlopens the library under its usual names to see whether it is there.
        let present = unsafe { sys::is_culib_present() };
        present && !matches!(value.trim(), "0" | "off" | "false")
    })
}

/// The tuner of a device, created on first use.
fn tuner(device: &CudaDevice) -> Result<Arc<Mutex<Tuner>>> {
    static TUNERS: OnceLock<Mutex<HashMap<usize, Arc<Mutex<Tuner>>>>> = OnceLock::new();
    per_device(&TUNERS, device, || Tuner::new(device).map(Mutex::new))
}

/// A device's cublasLt handle and workspace, its choices, and the file they persist in.
struct Tuner {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// Choices made or checked in this process.
    choices: HashMap<GemmKey, Choice>,
    /// Choices read from the file, not yet checked against this library.
    stored: HashMap<GemmKey, Choice>,
    /// The descriptors of the shapes that run a cublasLt algorithm, made on first use.
    plans: HashMap<GemmKey, LtPlan>,
    file: PathBuf,
}

// SAFETY: the handle and the plans' descriptors are only used under the tuner's mutex, and
// cublasLt's objects may be used from any thread.
unsafe impl Send for Tuner {}

impl Tuner {
    fn new(device: &CudaDevice) -> Result<Tuner> {
        let workspace = device.zeros::<u8>(WORKSPACE_BYTES)?;
        let handle = lt::create_handle().map_err(|e| cuda_err("cublasLtCreate", e))?;
        // SAFETY: cublasLtGetVersion only reads the library's version number.
        let version = unsafe { sys::cublasLtGetVersion() };
        let arch = device.arch();
        let id = fnv1a64(&[device.name().as_bytes(), arch.as_bytes()]);
        let file = cache_dir()
            .join("gemm")
            .join(format!("{arch}-{id:016x}-cublasLt{version}.tsv"));
        let stored = std::fs::read_to_string(&file)
            .map(|text| parse_choices(&text))
            .unwrap_or_default();
        Ok(Tuner {
            handle,
            workspace,
            choices: HashMap::new(),
            stored,
            plans: HashMap::new(),
            file,
        })
    }

    /// The shape's choice: made in this process, else read from the file and still valid
    /// for this library, else timed now (and written to the file).
    fn choice(
        &mut self,
        device: &CudaDevice,
        product: &Product,
        default: &dyn Fn(u64) -> Result<()>,
    ) -> Result<Choice> {
        let key = product.key;
        if let Some(choice) = self.choices.get(&key) {
            return Ok(*choice);
        }
        let full = self.choices.len() + self.stored.len() >= MAX_SHAPES;
        if full && !self.stored.contains_key(&key) {
            // Past MAX_SHAPES (prompts of many lengths) new shapes keep the default, untimed.
            return Ok(Choice::Default);
        }
        let plan = LtPlan::new(&key)?;
        let stored = self.stored.remove(&key).filter(|choice| match choice {
            Choice::Default => true,
            Choice::Algo(algo) => plan.supports(self.handle, algo),
        });
        if let Some(choice) = stored {
            self.choices.insert(key, choice);
            return Ok(choice);
        }
        let choice = self.time(device, &plan, product, default)?;
        self.choices.insert(key, choice);
        // A cache that cannot be written costs a re-tuning next run, nothing more.
        let _ = write_atomic(&self.file, self.render().as_bytes());
        Ok(choice)
    }

    /// Times the default and each candidate (the smallest of [`ROUNDS`] means of
    /// [`REPEATS`] runs) and keeps the fastest candidate if it wins by [`MIN_GAIN`].
    /// A product that overwrites C is timed on C itself (the caller writes it next); one that
    /// adds to C on a zeroed scratch C of the same layout.
    fn time(
        &self,
        device: &CudaDevice,
        plan: &LtPlan,
        product: &Product,
        default: &dyn Fn(u64) -> Result<()>,
    ) -> Result<Choice> {
        let algos = plan.candidates(self.handle, product.key.align)?;
        let key = &product.key;
        let c_len = key.ldc as usize * key.n as usize * key.c_type.block_bytes();
        let scratch = match key.accumulate {
            true => Some(device.zeros::<u8>(c_len)?),
            false => None,
        };
        let stream = device.stream();
        let c = match &scratch {
            Some(s) => s.device_ptr(stream).0,
            None => product.c,
        };
        let mean_ms = |run: &dyn Fn() -> Result<()>| -> Result<f32> {
            run()?;
            let start = stream.record_event(Some(TIMED)).map_err(event_err)?;
            for _ in 0..REPEATS {
                run()?;
            }
            let end = stream.record_event(Some(TIMED)).map_err(event_err)?;
            Ok(start.elapsed_ms(&end).map_err(event_err)? / REPEATS as f32)
        };
        let mut default_ms = f32::INFINITY;
        let mut algo_ms = vec![f32::INFINITY; algos.len()];
        for _ in 0..ROUNDS {
            default_ms = default_ms.min(mean_ms(&|| default(c))?);
            for (algo, best) in algos.iter().zip(&mut algo_ms) {
                // A candidate that fails to launch is skipped, not fatal.
                if let Ok(ms) = mean_ms(&|| self.run(device, plan, algo, product, c)) {
                    *best = best.min(ms);
                }
            }
        }
        let fastest = algo_ms
            .iter()
            .zip(&algos)
            .min_by(|x, y| x.0.total_cmp(y.0))
            .filter(|(ms, _)| **ms < default_ms * (1.0 - MIN_GAIN));
        Ok(fastest.map_or(Choice::Default, |(_, algo)| Choice::Algo(*algo)))
    }

    /// Runs the product with its shape's algorithm, on the shape's kept descriptors.
    fn run_planned(
        &mut self,
        device: &CudaDevice,
        algo: &sys::cublasLtMatmulAlgo_t,
        product: &Product,
    ) -> Result<()> {
        if let Entry::Vacant(slot) = self.plans.entry(product.key) {
            slot.insert(LtPlan::new(&product.key)?);
        }
        let plan = &self.plans[&product.key];
        self.run(device, plan, algo, product, product.c)
    }

    /// Runs the product with `algo` into the C at address `c`.
    fn run(
        &self,
        device: &CudaDevice,
        plan: &LtPlan,
        algo: &sys::cublasLtMatmulAlgo_t,
        product: &Product,
        c: u64,
    ) -> Result<()> {
        let stream = device.stream();
        let (workspace, _rw) = self.workspace.device_ptr(stream);
        let beta = product.beta();
        // SAFETY: `plan` describes the operands at `product.a`, `product.b` and `c` (the
        // caller checked their sizes; `c` is the product's C or a scratch of its layout);
        // alpha and beta are f32 as the f32 scale type requires; the workspace is ours, on
        // the stream every product of this device runs on.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&product.alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                product.a as *const c_void,
                plan.a,
                product.b as *const c_void,
                plan.b,
                c as *const c_void,
                plan.c,
                c as *mut c_void,
                plan.c,
                algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| cuda_err("cublasLtMatmul", e))
    }

    /// Every choice, one line a shape, for the file.
    fn render(&self) -> String {
        let mut lines: Vec<String> = self
            .choices
            .iter()
            .chain(&self.stored)
            .map(|(key, choice)| render_choice(key, choice))
            .collect();
        lines.sort();
        let header =
            "# fastllama cuBLAS algorithm choices (crates/llama-ops/src/cuda/gemm_tune.rs): \
                      m n k trans_a trans_b lda ldb ldc a_type c_type accumulate align choice\n";
        format!("{header}{}\n", lines.join("\n"))
    }
}

impl Drop for Tuner {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and nothing uses it after the tuner.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

const TIMED: cudarc::driver::sys::CUevent_flags =
    cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;

/// A cublasLt operation (f32 compute and scale) and its layouts (C serves as D too),
/// destroyed on drop.
struct LtPlan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
}

impl LtPlan {
    fn new(key: &GemmKey) -> Result<LtPlan> {
        let err = |e| cuda_err("cublasLt descriptors", e);
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(err)?;
        // Stored shapes: op(A) [m, k] is A [k, m] when transposed; op(B) [k, n] likewise.
        let (a_rows, a_cols) = if key.trans_a {
            (key.k, key.m)
        } else {
            (key.m, key.k)
        };
        let (b_rows, b_cols) = if key.trans_b {
            (key.n, key.k)
        } else {
            (key.k, key.n)
        };
        let layout = |dtype, rows: u32, cols: u32, ld: u32| {
            lt::create_matrix_layout(lt_type(dtype), rows.into(), cols.into(), ld.into())
                .map_err(err)
        };
        // Built field by field so that a failure drops (destroys) what exists already.
        let mut plan = LtPlan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
        };
        plan.a = layout(key.a_type, a_rows, a_cols, key.lda)?;
        plan.b = layout(key.a_type, b_rows, b_cols, key.ldb)?;
        plan.c = layout(key.c_type, key.m, key.n, key.ldc)?;
        for (attr, trans) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                key.trans_a,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                key.trans_b,
            ),
        ] {
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, as an int32 attribute.
            let op = i32::from(trans);
            // SAFETY: the attribute is an int32 and `op` lives through the call.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    (&op) as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(err)?;
        }
        Ok(plan)
    }

    /// cublasLt's first [`CANDIDATES`] heuristic candidates within the workspace, for
    /// operands aligned to `align` bytes.
    fn candidates(
        &self,
        handle: sys::cublasLtHandle_t,
        align: u16,
    ) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        let err = |e| cuda_err("cublasLtMatmulAlgoGetHeuristic", e);
        let pref = lt::create_matmul_pref().map_err(err)?;
        let (limit, align) = (WORKSPACE_BYTES as u64, u32::from(align));
        let settings: [(Pref, *const c_void, usize); 5] = [
            (
                Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&limit) as *const u64 as _,
                8,
            ),
            (
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                (&align) as *const u32 as _,
                4,
            ),
            (
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                (&align) as *const u32 as _,
                4,
            ),
            (
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                (&align) as *const u32 as _,
                4,
            ),
            (
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                (&align) as *const u32 as _,
                4,
            ),
        ];
        let mut results = vec![
            // SAFETY: a plain C struct of integers, for which all zeros is a valid value.
            unsafe { std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>() };
            CANDIDATES
        ];
        let mut found = 0i32;
        // SAFETY: each setting points at a live value of the size the attribute takes (a
        // uint64 workspace size, uint32 alignments); the preference, descriptor and layouts
        // are live; `results` holds CANDIDATES entries for the library to fill and `found`
        // says how many it did.
        let status = unsafe {
            settings
                .iter()
                .try_for_each(|&(attr, value, size)| {
                    lt::set_matmul_pref_attribute(pref, attr, value, size)
                })
                .and_then(|()| {
                    let (desc, a, b, c) = (self.desc, self.a, self.b, self.c);
                    let (wanted, out) = (CANDIDATES as i32, results.as_mut_ptr());
                    sys::cublasLtMatmulAlgoGetHeuristic(
                        handle, desc, a, b, c, c, pref, wanted, out, &mut found,
                    )
                    .result()
                })
        };
        // SAFETY: created above and used by nothing else.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        status.map_err(err)?;
        results.truncate(found.max(0) as usize);
        Ok(results
            .into_iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }

    /// Whether this library can run `algo` on this plan within the workspace (a choice read
    /// from the file may come from a damaged file).
    fn supports(&self, handle: sys::cublasLtHandle_t, algo: &sys::cublasLtMatmulAlgo_t) -> bool {
        // SAFETY: as in `candidates`; `result` is written by the library.
        let mut result = unsafe { std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>() };
        let (desc, a, b, c) = (self.desc, self.a, self.b, self.c);
        // SAFETY: the descriptor and layouts are live; `algo` and `result` outlive the call.
        let status =
            unsafe { sys::cublasLtMatmulAlgoCheck(handle, desc, a, b, c, c, algo, &mut result) };
        status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && result.workspaceSize <= WORKSPACE_BYTES
    }
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: each object was created in `new` (null when its creation failed) and is
        // used by nothing after the plan.
        unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = lt::destroy_matrix_layout(layout);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn lt_type(dtype: DType) -> sys::cudaDataType {
    match dtype {
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        _ => sys::cudaDataType::CUDA_R_32F,
    }
}

fn cuda_err(what: &'static str, e: impl std::fmt::Display) -> crate::OpsError {
    llama_core::Error::cuda(what, e).into()
}

fn event_err(e: cudarc::driver::DriverError) -> crate::OpsError {
    cuda_err("timing a cuBLAS candidate", e)
}

/// The element types a key may name in the file (by [`DType::name`]).
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// One line of the file: the key's fields, then "default" or the algorithm's eight words in
/// hex (cublasLt documents the struct as storable and reusable with the same library).
fn render_choice(key: &GemmKey, choice: &Choice) -> String {
    let choice = match choice {
        Choice::Default => "default".to_string(),
        Choice::Algo(algo) => {
            let words: Vec<String> = algo.data.iter().map(|w| format!("{w:016x}")).collect();
            words.join(",")
        }
    };
    format!(
        "{} {} {} {} {} {} {} {} {} {} {} {} {choice}",
        key.m,
        key.n,
        key.k,
        u8::from(key.trans_a),
        u8::from(key.trans_b),
        key.lda,
        key.ldb,
        key.ldc,
        key.a_type.name(),
        key.c_type.name(),
        u8::from(key.accumulate),
        key.align,
    )
}

/// The file's choices; comments and lines that do not parse are skipped (they are re-tuned).
fn parse_choices(text: &str) -> HashMap<GemmKey, Choice> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(parse_choice)
        .collect()
}

fn parse_choice(line: &str) -> Option<(GemmKey, Choice)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [m, n, k, ta, tb, lda, ldb, ldc, a_type, c_type, acc, align, choice] = fields[..] else {
        return None;
    };
    let flag = |s: &str| match s {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    };
    let dtype = |s: &str| DTYPES.into_iter().find(|d| d.name() == s);
    let key = GemmKey {
        m: m.parse().ok()?,
        n: n.parse().ok()?,
        k: k.parse().ok()?,
        trans_a: flag(ta)?,
        trans_b: flag(tb)?,
        lda: lda.parse().ok()?,
        ldb: ldb.parse().ok()?,
        ldc: ldc.parse().ok()?,
        a_type: dtype(a_type)?,
        c_type: dtype(c_type)?,
        accumulate: flag(acc)?,
        align: align.parse().ok().filter(|a: &u16| a.is_power_of_two())?,
    };
    let choice = if choice == "default" {
        Choice::Default
    } else {
        let words: Vec<u64> = choice
            .split(',')
            .map(|w| u64::from_str_radix(w, 16).ok())
            .collect::<Option<_>>()?;
        Choice::Algo(sys::cublasLtMatmulAlgo_t {
            data: words.try_into().ok()?,
        })
    };
    Some((key, choice))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(accumulate: bool) -> GemmKey {
        GemmKey {
            m: 8192,
            n: 8192,
            k: 2048,
            trans_a: true,
            trans_b: false,
            lda: 2048,
            ldb: 2048,
            ldc: 8192,
            a_type: DType::BF16,
            c_type: DType::BF16,
            accumulate,
            align: 256,
        }
    }

    #[test]
    fn choices_survive_the_file() {
        let algo = sys::cublasLtMatmulAlgo_t {
            data: [1, u64::MAX, 0, 7, 0xdead_beef, 2, 3, 1 << 63],
        };
        let choices = [
            (key(false), Choice::Algo(algo)),
            (key(true), Choice::Default),
        ];
        let text: Vec<String> = choices.iter().map(|(k, c)| render_choice(k, c)).collect();
        let parsed = parse_choices(&format!("# header\n{}\n", text.join("\n")));
        assert_eq!(parsed, choices.into_iter().collect());
    }

    #[test]
    fn damaged_lines_are_skipped() {
        let good = render_choice(&key(false), &Choice::Default);
        let text = [
            good.as_str(),
            "8192 8192 2048 1 0 2048 2048 8192 BF16 BF16 0 256",
            "8192 8192 2048 2 0 2048 2048 8192 BF16 BF16 0 256 default",
            "8192 8192 2048 1 0 2048 2048 8192 F64 BF16 0 256 default",
            "8192 8192 2048 1 0 2048 2048 8192 BF16 BF16 0 48 default",
            "8192 8192 2048 1 0 2048 2048 8192 BF16 BF16 1 256 00,11",
            "8192 8192 2048 1 0 2048 2048 8192 BF16 BF16 1 256 zz,0,0,0,0,0,0,0",
            "",
        ]
        .join("\n");
        let parsed = parse_choices(&text);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed.get(&key(false)), Some(&Choice::Default));
    }

    #[test]
    fn only_large_aligned_products_are_tuned() {
        let product = |m: u32, align: u16| Product {
            key: GemmKey {
                m,
                align,
                ..key(false)
            },
            a: 0,
            b: 0,
            c: 0,
            alpha: 1.0,
        };
        assert!(product(8192, 256).worth_tuning());
        // 2,048 × 8,192 × 2,048 = 2^35 multiply-adds from a column window 32 bytes in.
        assert!(product(2048, 32).worth_tuning());
        // 16 × 8,192 × 2,048 = 2^28: a LoRA branch.
        assert!(!product(16, 256).worth_tuning());
        assert!(!product(8192, 8).worth_tuning());
    }

    #[test]
    fn alignment_is_the_least_of_the_addresses() {
        assert_eq!(alignment(&[0x7f00_0000_0000, 0x7f00_1000_0000]), 256);
        assert_eq!(alignment(&[0x7f00_0000_0000, 0x7f00_1000_0020]), 32);
        assert_eq!(alignment(&[0x7f00_0000_0002]), 2);
    }
}
