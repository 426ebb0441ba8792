//! `fastllama-experiments`: the four experiments of SPEC part 8, run by
//! `cargo xtask experiment <long-context|kv-cache|lora|quantization|all> [--device cpu|cuda] [--quick]`.
//!
//! Each experiment measures on one device and returns a [`report::Section`] (tables, plots,
//! findings, raw numbers); the section is saved as JSON under target/experiments/, and the
//! page docs/experiments/<name>.md with its figure <name>.svg is drawn from every device's
//! section found there (so a GPU run's JSON, copied back, joins the CPU's page).

mod kv_cache;
mod long_context;
mod lora;
mod memory;
mod plot;
mod quantization;
mod report;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use crate::report::{load_sections, page, save_section};
use crate::setup::Context;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

#[global_allocator]
static ALLOCATOR: memory::Counting = memory::Counting;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    LongContext,
    KvCache,
    Lora,
    Quantization,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Parser)]
#[command(
    name = "fastllama-experiments",
    about = "fastllama's experiments: long context, KV cache, LoRA ranks and targets, quantisation"
)]
struct Cli {
    #[arg(value_enum)]
    experiment: Which,
    /// Where to run: the CPU, or the first CUDA device (long-context and kv-cache only).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// The reduced grid (under two minutes on a 2-core machine), pages under
    /// target/experiments/quick unless --docs says otherwise.
    #[arg(long)]
    quick: bool,
    /// The repository (data files, default paths); default: this crate's workspace.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Where the pages (<name>.md, <name>.svg) go; default docs/experiments (full grid).
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Where the raw numbers (JSON) go; default target/experiments.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Redraw the pages from the JSON already saved, without running anything.
    #[arg(long)]
    render_only: bool,
}

/// The experiments, in the order of SPEC part 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Experiment {
    LongContext,
    KvCache,
    Lora,
    Quantization,
}

impl Experiment {
    const ALL: [Experiment; 4] = [
        Experiment::LongContext,
        Experiment::KvCache,
        Experiment::Lora,
        Experiment::Quantization,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Experiment::LongContext => "long-context",
            Experiment::KvCache => "kv-cache",
            Experiment::Lora => "lora",
            Experiment::Quantization => "quantization",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Experiment::LongContext => long_context::TITLE,
            Experiment::KvCache => kv_cache::TITLE,
            Experiment::Lora => lora::TITLE,
            Experiment::Quantization => quantization::TITLE,
        }
    }

    fn about(self) -> &'static str {
        match self {
            Experiment::LongContext => long_context::ABOUT,
            Experiment::KvCache => kv_cache::ABOUT,
            Experiment::Lora => lora::ABOUT,
            Experiment::Quantization => quantization::ABOUT,
        }
    }

    /// Whether the experiment has a GPU version (random weights of larger shapes).
    fn runs_on_cuda(self) -> bool {
        matches!(self, Experiment::LongContext | Experiment::KvCache)
    }

    fn run(self, ctx: &Context) -> Result<report::Section, Error> {
        match self {
            Experiment::LongContext => long_context::run(ctx),
            Experiment::KvCache => kv_cache::run(ctx),
            Experiment::Lora => lora::run(ctx),
            Experiment::Quantization => quantization::run(ctx),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Run on one of rayon's workers, as `fastllama` does: a decode step's many small parallel
    // ops then keep the calling thread busy too instead of waking it for each.
    let result = rayon::ThreadPoolBuilder::new()
        .build()
        .map_err(Error::from)
        .and_then(|pool| pool.install(|| run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    let root = cli.root.unwrap_or_else(setup::workspace_root);
    let data = cli.data.unwrap_or_else(|| root.join("target/experiments"));
    let docs = cli.docs.unwrap_or_else(|| {
        if cli.quick {
            data.join("quick")
        } else {
            root.join("docs/experiments")
        }
    });
    std::fs::create_dir_all(&data)?;
    std::fs::create_dir_all(&docs)?;
    let chosen: Vec<Experiment> = match cli.experiment {
        Which::LongContext => vec![Experiment::LongContext],
        Which::KvCache => vec![Experiment::KvCache],
        Which::Lora => vec![Experiment::Lora],
        Which::Quantization => vec![Experiment::Quantization],
        Which::All => Experiment::ALL.to_vec(),
    };
    let cuda = cli.device == DeviceArg::Cuda;
    let ctx = if cli.render_only {
        None
    } else {
        Some(Context::new(root, cli.quick, cuda)?)
    };
    for experiment in chosen {
        if let Some(ctx) = &ctx {
            if cuda && !experiment.runs_on_cuda() {
                eprintln!(
                    "{}: runs on the CPU only (it needs the real model's weights)",
                    experiment.name()
                );
                continue;
            }
            let section = experiment.run(ctx)?;
            save_section(&data, &section)?;
        }
        let sections = load_sections(&data, experiment.name(), cli.quick)?;
        if sections.is_empty() {
            eprintln!(
                "{}: no results in {} yet",
                experiment.name(),
                data.display()
            );
            continue;
        }
        let svg_name = format!("{}.svg", experiment.name());
        let text = page(experiment.title(), experiment.about(), &svg_name, &sections);
        llama_core::write_atomic(
            &docs.join(format!("{}.md", experiment.name())),
            text.as_bytes(),
        )?;
        let svg = plot::figure(&sections)?;
        llama_core::write_atomic(&docs.join(&svg_name), svg.as_bytes())?;
        eprintln!(
            "{}: {} and {} written",
            experiment.name(),
            docs.join(format!("{}.md", experiment.name())).display(),
            svg_name
        );
    }
    Ok(())
}
