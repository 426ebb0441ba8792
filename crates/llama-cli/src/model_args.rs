//! The arguments every model command shares (--model, --device, --precision, the prompt) and
//! loading with progress bars.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use llama_core::cuda::{self, CudaDevice};
use llama_model::{
    load, resolve_model, ChatMessage, Engine, LlamaModel, LoadedModel, Precision, DEFAULT_MODEL,
};
use llama_peft::LoraAdapter;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The GPU when one is present and the model can run there, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// f32 activations, weights dequantised exactly: HF transformers' numbers.
    Exact,
    /// Faster arithmetic within a stated bound of `exact`: 8-bit activations for decoding with
    /// 4/8-bit weights, bf16 products for CPU training on CPUs with AVX512-BF16.
    Fast,
}

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// An HF model directory, a .gguf file, or the name of the default model (fetched on first
    /// use into $FASTLLAMA_CACHE).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fast)]
    pub precision: PrecisionArg,
    /// A LoRA adapter directory (peft's format) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Run every op on its reference implementation (f64 loops; slow, on the CPU): the
    /// unpatched model, to compare the patched one with.
    #[arg(long)]
    pub unpatched: bool,
}

/// A prompt given as text or as token ids.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// The prompt text.
    #[arg(long)]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<u32>>,
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// The path of `model`, fetched first (with a spinner) when it is the default model's name.
pub fn fetch(model: &str) -> Result<PathBuf, String> {
    let bar = spinner(format!("locating {model}"));
    let path = resolve_model(model, &mut |stage| bar.set_message(stage.to_string()))
        .map_err(|e| e.to_string());
    bar.finish_and_clear();
    path
}

impl ModelArgs {
    /// Resolves, fetches if needed, and loads the model, with progress on stderr.
    pub fn load(&self) -> Result<LoadedModel, String> {
        self.cuda_device()?;
        let fetch = spinner(format!("locating {}", self.model));
        let path = resolve_model(&self.model, &mut |stage| {
            fetch.set_message(stage.to_string())
        })
        .map_err(|e| e.to_string())?;
        fetch.finish_and_clear();
        let bar = ProgressBar::new(1).with_style(
            ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(
            path.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        );
        let precision = match self.precision {
            PrecisionArg::Exact => Precision::Exact,
            PrecisionArg::Fast => Precision::Fast,
        };
        let loaded = load(&path, precision, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .map_err(|e| e.to_string())?;
        bar.finish_and_clear();
        let mut loaded = loaded;
        if let Some(dir) = &self.adapter {
            let adapter = LoraAdapter::load(dir, loaded.model.dims()).map_err(|e| e.to_string())?;
            loaded
                .model
                .set_adapter(Some(adapter))
                .map_err(|e| e.to_string())?;
        }
        if self.unpatched {
            loaded.model.unpatch();
        }
        Ok(loaded)
    }

    /// The CUDA device to run on, if any: `auto` takes the first GPU when there is one and the
    /// precision is `fast` (the GPU computes in bf16; `exact` is the CPU's f32).
    pub fn cuda_device(&self) -> Result<Option<Arc<CudaDevice>>, String> {
        let available = cuda::device_count().is_ok_and(|n| n > 0);
        match (self.device, self.precision) {
            (DeviceArg::Cpu, _) => Ok(None),
            (DeviceArg::Cuda, _) if !available => Err("--device cuda: no CUDA device is available".into()),
            (DeviceArg::Cuda, PrecisionArg::Exact) => {
                Err("--precision exact runs on the CPU (f32); the GPU computes in bf16: use --precision fast or --device cpu".into())
            }
            (DeviceArg::Auto, PrecisionArg::Exact) => Ok(None),
            (DeviceArg::Auto, _) if !available => Ok(None),
            (DeviceArg::Cuda | DeviceArg::Auto, PrecisionArg::Fast) => CudaDevice::get(0).map(Some).map_err(|e| e.to_string()),
        }
    }

    /// `model` where --device puts it.
    pub fn engine(&self, model: LlamaModel) -> Result<Engine, String> {
        let device = self.cuda_device()?;
        Engine::new(model, device.as_ref()).map_err(|e| e.to_string())
    }
}

impl PromptArgs {
    /// The prompt's ids: `--ids` as given, or `--prompt` tokenized (through the chat template
    /// when `chat`).
    pub fn ids(&self, loaded: &LoadedModel, chat: bool) -> Result<Vec<u32>, String> {
        if let Some(ids) = &self.ids {
            return Ok(ids.clone());
        }
        let text = self.prompt.as_deref().unwrap_or_default();
        prompt_ids(loaded, text, chat)
    }
}

/// Token ids of `text`, rendered through the chat template as one user turn when `chat`.
pub fn prompt_ids(loaded: &LoadedModel, text: &str, chat: bool) -> Result<Vec<u32>, String> {
    let tokenizer = loaded.tokenizer().map_err(|e| e.to_string())?;
    if !chat {
        return tokenizer.encode(text, true).map_err(|e| e.to_string());
    }
    // The template writes any BOS itself, so no special tokens are added (as HF's
    // apply_chat_template(tokenize=True) does).
    let rendered = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", text)], true)
        .map_err(|e| e.to_string())?;
    tokenizer
        .encode(&rendered, false)
        .map_err(|e| e.to_string())
}
