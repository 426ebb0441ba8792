//! `LoraConfig`: Unsloth's `get_peft_model` arguments, checked, and peft's adapter_config.json.

use serde_json::{json, Value};

use crate::error::{config_error, PeftError, Result};

/// A projection LoRA can wrap, in the order the layers apply them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

/// The sizes LoRA matrices take their shapes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelDims {
    pub num_layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    /// num_heads · head_dim.
    pub q_width: usize,
    /// num_kv_heads · head_dim.
    pub kv_width: usize,
    /// The vocabulary (rows of embed_tokens and lm_head).
    pub vocab: usize,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    /// HF's module name (`q_proj`, …).
    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn path(self) -> String {
        let block = match self {
            Target::QProj | Target::KProj | Target::VProj | Target::OProj => "self_attn",
            _ => "mlp",
        };
        format!("{block}.{}", self.name())
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The base weight's shape, (out_features, in_features).
    pub fn shape(self, dims: &ModelDims) -> (usize, usize) {
        match self {
            Target::QProj => (dims.q_width, dims.hidden),
            Target::KProj | Target::VProj => (dims.kv_width, dims.hidden),
            Target::OProj => (dims.hidden, dims.q_width),
            Target::GateProj | Target::UpProj => (dims.intermediate, dims.hidden),
            Target::DownProj => (dims.hidden, dims.intermediate),
        }
    }
}

/// How lora_A starts (lora_B starts at zero either way, so the adapter starts as the identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// peft's default (`init_lora_weights=True`): kaiming-uniform with a = √5, i.e.
    /// U(−1/√in, 1/√in).
    #[default]
    Kaiming,
    /// `init_lora_weights="gaussian"`: N(0, 1/r).
    Gaussian,
}

/// A whole module trained and saved beside the adapter (peft's `modules_to_save`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavedModule {
    EmbedTokens,
    LmHead,
}

impl SavedModule {
    pub fn name(self) -> &'static str {
        match self {
            SavedModule::EmbedTokens => "embed_tokens",
            SavedModule::LmHead => "lm_head",
        }
    }
}

/// LoRA settings (Unsloth's `get_peft_model` arguments). Build with [`LoraConfig::new`] and
/// the fields, then [`LoraConfig::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub target_modules: Vec<Target>,
    /// Only "none" is supported.
    pub bias: String,
    /// Scale by alpha / √r instead of alpha / r.
    pub use_rslora: bool,
    /// Layers that get adapters (None: all).
    pub layers_to_transform: Option<Vec<usize>>,
    pub init_lora_weights: LoraInit,
    pub random_state: u64,
    pub modules_to_save: Vec<SavedModule>,
}

const TARGET_NAMES: &str =
    "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear";

impl LoraConfig {
    /// Rank `r`, `lora_alpha`, all seven projections, no dropout, peft's defaults elsewhere
    /// (Unsloth's random_state 3407).
    pub fn new(r: usize, lora_alpha: f32) -> LoraConfig {
        LoraConfig {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: Target::ALL.to_vec(),
            bias: "none".into(),
            use_rslora: false,
            layers_to_transform: None,
            init_lora_weights: LoraInit::Kaiming,
            random_state: 3407,
            modules_to_save: Vec::new(),
        }
    }

    /// Target names as peft takes them: module names, or `all-linear` for all seven.
    pub fn parse_targets<S: AsRef<str>>(names: &[S]) -> Result<Vec<Target>> {
        let mut targets = Vec::new();
        for name in names {
            let name = name.as_ref().trim();
            if name == "all-linear" {
                return Ok(Target::ALL.to_vec());
            }
            match Target::from_name(name) {
                Some(t) if !targets.contains(&t) => targets.push(t),
                Some(_) => {}
                None => {
                    return config_error(
                        "target_modules",
                        format!("{name:?}"),
                        format!("must be among {TARGET_NAMES}"),
                    )
                }
            }
        }
        targets.sort();
        Ok(targets)
    }

    /// Parses modules_to_save names (`embed_tokens`, `lm_head`).
    pub fn parse_modules_to_save<S: AsRef<str>>(names: &[S]) -> Result<Vec<SavedModule>> {
        names
            .iter()
            .map(|n| match n.as_ref() {
                "embed_tokens" => Ok(SavedModule::EmbedTokens),
                "lm_head" => Ok(SavedModule::LmHead),
                other => config_error(
                    "modules_to_save",
                    format!("{other:?}"),
                    "must be embed_tokens or lm_head",
                ),
            })
            .collect()
    }

    /// Parses `init_lora_weights`: true/"kaiming" (peft's default) or "gaussian".
    pub fn parse_init(value: &str) -> Result<LoraInit> {
        match value {
            "true" | "True" | "kaiming" | "default" => Ok(LoraInit::Kaiming),
            "gaussian" => Ok(LoraInit::Gaussian),
            other => config_error(
                "init_lora_weights",
                format!("{other:?}"),
                "must be true (kaiming-uniform) or gaussian",
            ),
        }
    }

    /// Checks every setting against a model of `num_layers` layers.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if self.r == 0 {
            return config_error("r", self.r, "must be a positive integer");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return config_error("lora_alpha", self.lora_alpha, "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return config_error("lora_dropout", self.lora_dropout, "must be in [0, 1)");
        }
        if self.bias != "none" {
            return config_error(
                "bias",
                format!("{:?}", self.bias),
                "only \"none\" is supported (\"all\" and \"lora_only\" are not)",
            );
        }
        if self.target_modules.is_empty() {
            return config_error(
                "target_modules",
                "[]",
                format!("must name at least one of {TARGET_NAMES}"),
            );
        }
        if let Some(layers) = &self.layers_to_transform {
            if let Some(bad) = layers.iter().find(|&&l| l >= num_layers) {
                return config_error(
                    "layers_to_transform",
                    bad,
                    format!("must be layer indices below {num_layers}"),
                );
            }
            if layers.is_empty() {
                return config_error(
                    "layers_to_transform",
                    "[]",
                    "must list at least one layer (or be unset for all)",
                );
            }
        }
        Ok(())
    }

    /// The factor s of y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ: alpha/√r with rsLoRA, else alpha/r.
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f32).sqrt()
        } else {
            self.lora_alpha / self.r as f32
        }
    }

    /// Whether layer `index` gets adapters.
    pub fn transforms_layer(&self, index: usize) -> bool {
        self.layers_to_transform
            .as_ref()
            .is_none_or(|l| l.contains(&index))
    }

    /// peft's adapter_config.json for a causal LM.
    pub fn to_peft_json(&self, base_model: Option<&str>) -> Value {
        let init = match self.init_lora_weights {
            LoraInit::Kaiming => json!(true),
            LoraInit::Gaussian => json!("gaussian"),
        };
        let modules: Option<Vec<&str>> = (!self.modules_to_save.is_empty())
            .then(|| self.modules_to_save.iter().map(|m| m.name()).collect());
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "fan_in_fan_out": false,
            "init_lora_weights": init,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": null,
            "modules_to_save": modules,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": true,
            "revision": null,
        })
    }

    /// Reads peft's adapter_config.json; settings fastllama cannot honour (DoRA, per-module
    /// rank or alpha patterns, fan_in_fan_out, biases) are errors naming them.
    pub fn from_peft_json(v: &Value) -> Result<LoraConfig> {
        let bad = |arg: &'static str, allowed: &str| -> PeftError {
            PeftError::Config {
                arg,
                value: v.get(arg).map_or("missing".into(), Value::to_string),
                allowed: allowed.into(),
            }
        };
        if v.get("peft_type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "LORA")
        {
            return Err(bad("peft_type", "only LORA adapters are supported"));
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("r", "must be a positive integer"))?;
        let alpha = v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("lora_alpha", "must be a number"))?;
        let mut config = LoraConfig::new(r as usize, alpha as f32);
        config.lora_dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        config.target_modules = match v.get("target_modules") {
            Some(Value::String(s)) => LoraConfig::parse_targets(&[s.as_str()])?,
            Some(Value::Array(names)) => {
                let names: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
                LoraConfig::parse_targets(&names)?
            }
            _ => return Err(bad("target_modules", "must be a list of module names")),
        };
        config.bias = v
            .get("bias")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        config.use_rslora = v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        config.layers_to_transform = match v.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n
                .as_u64()
                .ok_or_else(|| bad("layers_to_transform", "must be layer indices"))?
                as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("layers_to_transform", "must be layer indices"))?,
            ),
            Some(_) => return Err(bad("layers_to_transform", "must be layer indices")),
        };
        config.init_lora_weights = match v.get("init_lora_weights") {
            Some(Value::String(s)) => LoraConfig::parse_init(s)?,
            _ => LoraInit::Kaiming,
        };
        config.modules_to_save = match v.get("modules_to_save") {
            Some(Value::Array(a)) => {
                let names: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
                LoraConfig::parse_modules_to_save(&names)?
            }
            _ => Vec::new(),
        };
        for (arg, unsupported) in [
            (
                "use_dora",
                v.get("use_dora").and_then(Value::as_bool) == Some(true),
            ),
            (
                "fan_in_fan_out",
                v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true),
            ),
            (
                "rank_pattern",
                v.get("rank_pattern")
                    .and_then(Value::as_object)
                    .is_some_and(|m| !m.is_empty()),
            ),
            (
                "alpha_pattern",
                v.get("alpha_pattern")
                    .and_then(Value::as_object)
                    .is_some_and(|m| !m.is_empty()),
            ),
        ] {
            if unsupported {
                return Err(bad(arg, "is not supported by fastllama (plain LoRA only)"));
            }
        }
        Ok(config)
    }
}
