//! What every experiment needs: where it runs, the grid size, the default model, the fixed
//! English text, progress bars, and the [`Section`] it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use llama_core::cuda::CudaDevice;
use llama_model::{load, resolve_model, LlamaModel, Precision, Tokenizer, DEFAULT_MODEL};
use serde_json::Value;

use crate::memory::Peak;
use crate::report::{today, Plot, Section, Table};
use crate::{Error, Experiment};

/// The repository this binary was built from (its data files and default output paths), or
/// the working directory when that is gone (a binary copied to another machine).
pub fn workspace_root() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    built
        .canonicalize()
        .unwrap_or_else(|_| std::env::current_dir().unwrap_or_default())
}

pub struct Context {
    pub root: PathBuf,
    pub quick: bool,
    /// The GPU, for `--device cuda`.
    pub cuda: Option<Arc<CudaDevice>>,
}

impl Context {
    pub fn new(root: PathBuf, quick: bool, cuda: bool) -> Result<Context, Error> {
        let cuda = if cuda {
            Some(CudaDevice::get(0)?)
        } else {
            None
        };
        Ok(Context { root, quick, cuda })
    }

    /// `full` for the committed grid, `quick` for `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    fn device_name(&self) -> &'static str {
        if self.cuda.is_some() {
            "cuda"
        } else {
            "cpu"
        }
    }

    /// The processor in words: CPU model and threads, or the GPU's name and memory.
    fn machine(&self) -> String {
        if let Some(device) = &self.cuda {
            let gib = device.memory().map_or(String::new(), |(total, _)| {
                format!(", {:.0} GiB", total as f64 / (1u64 << 30) as f64)
            });
            return format!("{}{gib}", device.name());
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or("unknown CPU".to_string(), |m| m.trim().to_string());
        format!("{model}, {} threads", rayon::current_num_threads())
    }

    /// The section of `experiment` holding these results.
    pub fn section(
        &self,
        experiment: Experiment,
        tables: Vec<Table>,
        plots: Vec<Plot>,
        findings: Vec<String>,
        raw: Value,
    ) -> Section {
        let device = if self.cuda.is_some() {
            " --device cuda"
        } else {
            ""
        };
        let quick = if self.quick { " --quick" } else { "" };
        Section {
            experiment: experiment.name().into(),
            device: self.device_name().into(),
            machine: self.machine(),
            command: format!(
                "cargo xtask experiment {}{device}{quick}",
                experiment.name()
            ),
            date: today(),
            quick: self.quick,
            tables,
            plots,
            findings,
            raw,
        }
    }

    /// SmolLM2-135M-Instruct (Q4_1 GGUF, fetched on first use) in `precision`.
    pub fn smollm2(&self, precision: Precision) -> Result<(LlamaModel, Tokenizer), Error> {
        let path = resolve_model(DEFAULT_MODEL, &mut |_| {})?;
        let loaded = load(&path, precision, &mut |_, _| {})?;
        let tokenizer = loaded
            .tokenizer
            .map_err(|e| format!("SmolLM2's tokenizer: {e}"))?;
        Ok((loaded.model, tokenizer))
    }

    /// The tokens of the repository's LICENSE (the Apache-2.0 text): the fixed English text.
    pub fn licence_tokens(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>, Error> {
        let path = self.root.join("LICENSE");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e} (the fixed English text)", path.display()))?;
        let ids = tokenizer.encode(&text, false)?;
        if ids.is_empty() {
            return Err(format!("{}: no tokens", path.display()).into());
        }
        Ok(ids)
    }

    /// The licence's first `n` tokens, the text repeated from its start as often as needed.
    pub fn licence_ids(&self, tokenizer: &Tokenizer, n: usize) -> Result<Vec<u32>, Error> {
        let ids = self.licence_tokens(tokenizer)?;
        Ok(ids.iter().copied().cycle().take(n).collect())
    }

    /// A bar over `runs` measurements of `experiment`.
    pub fn progress(&self, experiment: Experiment, runs: usize) -> Progress {
        let bar = ProgressBar::new(runs as u64).with_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .expect("a valid template") // a constant, not user input
                .progress_chars("=> "),
        );
        bar.set_prefix(experiment.name());
        Progress { bar }
    }
}

/// Progress over an experiment's runs.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// Starts the run described by `what`; the returned guard advances the bar when dropped.
    pub fn run(&self, what: String) -> RunGuard<'_> {
        self.bar.set_message(what);
        RunGuard { bar: &self.bar }
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

pub struct RunGuard<'a> {
    bar: &'a ProgressBar,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.bar.inc(1);
    }
}

/// Seconds `f` took, with its result.
pub fn timed<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed().as_secs_f64(), out)
}

/// The memory of one measured stretch: the heap's peak on the CPU, the device memory pool's
/// peak on the GPU, each above what was in use at the start.
pub enum Meter<'a> {
    Heap(Peak),
    Device { device: &'a CudaDevice, base: usize },
}

impl Context {
    /// Starts measuring memory on this experiment's device.
    pub fn meter(&self) -> Result<Meter<'_>, Error> {
        Ok(match &self.cuda {
            None => Meter::Heap(Peak::start()),
            Some(device) => {
                device.synchronize()?;
                device.reset_peak()?;
                let base = device
                    .pool_in_use()?
                    .ok_or("this GPU allocates without a memory pool")?;
                Meter::Device { device, base }
            }
        })
    }
}

impl Meter<'_> {
    /// The peak since the start, in bytes above what was in use then.
    pub fn above_start(&self) -> Result<usize, Error> {
        Ok(match self {
            Meter::Heap(peak) => peak.above_start(),
            Meter::Device { device, base } => {
                device.synchronize()?;
                device.pool_peak()?.unwrap_or(0).saturating_sub(*base)
            }
        })
    }
}
