//! Reading reference fixtures: `<name>.safetensors` + `<name>.json` under `$LLAMA_FIXTURES`.

use std::path::{Path, PathBuf};

use llama_core::Tensor;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// Environment variable naming the fixture directory.
pub const FIXTURES_ENV: &str = "LLAMA_FIXTURES";

/// `$LLAMA_FIXTURES`, or `../shared/fixtures` beside the project root.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os(FIXTURES_ENV).filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    }
}

/// The names of the directories under `fixtures_dir()/subdir` that hold a file `marker`
/// (`models` with `config.json`, `peft` with `adapter_config.json`), sorted. Panics when there
/// are none: a test over every fixture of a kind would then test nothing.
pub fn fixture_names(subdir: &str, marker: &str) -> Vec<String> {
    let root = fixtures_dir().join(subdir);
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e} (set {FIXTURES_ENV})", root.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(marker).exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no {subdir} fixtures with {marker} under {}",
        root.display()
    );
    names
}

/// One fixture: its tensors (read whole into memory) and its JSON notes.
pub struct Fixture {
    name: String,
    bytes: Vec<u8>,
    json: Value,
}

impl Fixture {
    /// Opens `<dir>/<stem>.safetensors` and, when present, `<dir>/<stem>.json`, where `stem` is
    /// relative to [`fixtures_dir`], e.g. `ops/ops` or `models/tiny-llama/reference`.
    /// Panics with the path when the files are missing or malformed: a test cannot go on.
    pub fn open(stem: &str) -> Fixture {
        let base = fixtures_dir().join(stem);
        let st = base.with_extension("safetensors");
        let bytes = std::fs::read(&st).unwrap_or_else(|e| {
            panic!(
                "fixture {}: {e} (set {FIXTURES_ENV} to the fixture directory)",
                st.display()
            )
        });
        if let Err(e) = SafeTensors::deserialize(&bytes) {
            panic!("fixture {}: not a safetensors file: {e}", st.display());
        }
        let json_path = base.with_extension("json");
        let json = match std::fs::read_to_string(&json_path) {
            Ok(text) => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("fixture {}: {e}", json_path.display())),
            Err(_) => Value::Null,
        };
        Fixture {
            name: stem.to_string(),
            bytes,
            json,
        }
    }

    /// The fixture's JSON notes (`Value::Null` when it has none).
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        names.sort();
        names
    }

    /// True when the fixture holds a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }

    /// A float tensor as a host `Tensor` of its stored dtype.
    pub fn tensor(&self, name: &str) -> Tensor {
        let tensors = self.tensors();
        let view = tensors
            .tensor(name)
            .unwrap_or_else(|e| panic!("fixture {}: tensor {name}: {e}", self.name));
        Tensor::from_safetensors(&view)
            .unwrap_or_else(|e| panic!("fixture {}: tensor {name}: {e}", self.name))
    }

    /// A float tensor widened to f32, with its shape.
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = self.tensor(name);
        let data = t
            .to_vec_f32()
            .unwrap_or_else(|e| panic!("fixture {}: tensor {name}: {e}", self.name));
        (data, t.dims().to_vec())
    }

    /// An integer tensor (I64 or I32, as token ids and labels are stored) as i64, with its shape.
    pub fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let tensors = self.tensors();
        let view = tensors
            .tensor(name)
            .unwrap_or_else(|e| panic!("fixture {}: tensor {name}: {e}", self.name));
        let data = match view.dtype() {
            Dtype::I64 => view
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("chunks of 8")))
                .collect(),
            Dtype::I32 => view
                .data()
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("chunks of 4"))))
                .collect(),
            other => panic!(
                "fixture {}: tensor {name} is {other:?}, not an integer",
                self.name
            ),
        };
        (data, view.shape().to_vec())
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("checked in Fixture::open")
    }
}
