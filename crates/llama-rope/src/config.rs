//! `RopeConfig`: the rotary-embedding settings of an HF `config.json`, from its
//! `rope_parameters` (transformers 5) or the legacy `rope_theta` + `rope_scaling` keys.

use serde_json::{Map, Value};

use crate::{Result, RopeError};

/// How the inverse frequencies are scaled, one variant per HF `rope_type`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// θ^(−2i/d), unscaled.
    Default,
    /// Positions divided by `factor` (equivalently, every inverse frequency).
    Linear { factor: f64 },
    /// NTK-aware: the base grows with the sequence once it passes the trained context.
    Dynamic { factor: f64 },
    /// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Phi-3 LongRoPE: per-frequency factors, short below the original context, long above.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        /// Defaults to max_position_embeddings / original_max_position_embeddings.
        factor: Option<f64>,
        attention_factor: Option<f64>,
        original_max_position_embeddings: usize,
    },
    /// YaRN: interpolation for long wavelengths, extrapolation for short, a linear ramp between.
    Yarn {
        /// Defaults to max_position_embeddings / original_max_position_embeddings.
        factor: Option<f64>,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        original_max_position_embeddings: usize,
        truncate: bool,
    },
}

impl RopeScaling {
    /// HF's name of the kind.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }
}

/// Everything needed to compute the rotary embedding of one attention layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// The base θ (`rope_theta`).
    pub theta: f64,
    /// Size of one attention head.
    pub head_dim: usize,
    /// How many leading dimensions of each head rotate: head_dim · partial_rotary_factor (even).
    pub rotary_dim: usize,
    /// The model's context (`max_position_embeddings`).
    pub max_position_embeddings: usize,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The plain RoPE of a head of `head_dim` with base `theta`.
    pub fn new(theta: f64, head_dim: usize, max_position_embeddings: usize) -> Result<RopeConfig> {
        let config = RopeConfig {
            theta,
            head_dim,
            rotary_dim: head_dim,
            max_position_embeddings,
            scaling: RopeScaling::Default,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a whole HF `config.json`: `head_dim` (or hidden_size / num_attention_heads),
    /// `max_position_embeddings`, `partial_rotary_factor`, and `rope_parameters` or the legacy
    /// `rope_theta` + `rope_scaling`.
    pub fn from_hf_config(config: &Value) -> Result<RopeConfig> {
        let obj = as_object(config, "config")?;
        let head_dim = match obj.get("head_dim").filter(|v| !v.is_null()) {
            Some(v) => usize_of(v, "head_dim")?,
            None => {
                let hidden = usize_of(required(obj, "hidden_size", "config")?, "hidden_size")?;
                let heads = usize_of(
                    required(obj, "num_attention_heads", "config")?,
                    "num_attention_heads",
                )?;
                if heads == 0 || hidden % heads != 0 {
                    return Err(invalid("num_attention_heads", "must divide hidden_size"));
                }
                hidden / heads
            }
        };
        let max_pos = usize_of(
            required(obj, "max_position_embeddings", "config")?,
            "max_position_embeddings",
        )?;
        // transformers 5 keeps everything in rope_parameters; older configs split it.
        let mut params = match obj.get("rope_parameters").filter(|v| !v.is_null()) {
            Some(p) => as_object(p, "rope_parameters")?.clone(),
            None => match obj.get("rope_scaling").filter(|v| !v.is_null()) {
                Some(s) => as_object(s, "rope_scaling")?.clone(),
                None => Map::new(),
            },
        };
        for key in ["rope_theta", "partial_rotary_factor"] {
            if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                params.entry(key).or_insert_with(|| v.clone());
            }
        }
        // Phi-3 keeps the pretraining context at the top level; HF gives that one priority.
        if let Some(v) = obj
            .get("original_max_position_embeddings")
            .filter(|v| !v.is_null())
        {
            params.insert("original_max_position_embeddings".into(), v.clone());
        }
        params.entry("rope_theta").or_insert(Value::from(10000.0));
        RopeConfig::from_rope_parameters(&Value::Object(params), head_dim, max_pos)
    }

    /// Reads an HF `rope_parameters` object (with `rope_theta` and `rope_type`; the legacy key
    /// `type` is accepted too) for heads of `head_dim` and a context of `max_position_embeddings`.
    pub fn from_rope_parameters(
        params: &Value,
        head_dim: usize,
        max_position_embeddings: usize,
    ) -> Result<RopeConfig> {
        let p = as_object(params, "rope_parameters")?;
        let rope_type = match p.get("rope_type").or_else(|| p.get("type")) {
            None | Some(Value::Null) => "default".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(invalid("rope_type", "must be a string")),
        };
        let theta = f64_of(required(p, "rope_theta", &rope_type)?, "rope_theta")?;
        let partial = match p.get("partial_rotary_factor").filter(|v| !v.is_null()) {
            Some(v) => f64_of(v, "partial_rotary_factor")?,
            None => 1.0,
        };
        let rotary_dim = (head_dim as f64 * partial) as usize;
        let field = |name: &'static str| required(p, name, &rope_type);
        let factor = || f64_of(field("factor")?, "factor");
        let opt_f64 = |name: &'static str| optional(p, name).map(|v| f64_of(v, name)).transpose();
        // llama3, longrope and yarn fall back to the model's context, as HF's standardisation does.
        let original = match optional(p, "original_max_position_embeddings") {
            Some(v) => usize_of(v, "original_max_position_embeddings")?,
            None => max_position_embeddings,
        };
        let scaling = match rope_type.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: f64_of(field("low_freq_factor")?, "low_freq_factor")?,
                high_freq_factor: f64_of(field("high_freq_factor")?, "high_freq_factor")?,
                original_max_position_embeddings: original,
            },
            "longrope" => RopeScaling::LongRope {
                short_factor: f64_list(field("short_factor")?, "short_factor")?,
                long_factor: f64_list(field("long_factor")?, "long_factor")?,
                factor: opt_f64("factor")?,
                attention_factor: opt_f64("attention_factor")?,
                original_max_position_embeddings: original,
            },
            "yarn" => RopeScaling::Yarn {
                factor: opt_f64("factor")?,
                attention_factor: opt_f64("attention_factor")?,
                beta_fast: opt_f64("beta_fast")?.unwrap_or(32.0),
                beta_slow: opt_f64("beta_slow")?.unwrap_or(1.0),
                mscale: opt_f64("mscale")?,
                mscale_all_dim: opt_f64("mscale_all_dim")?,
                original_max_position_embeddings: original,
                truncate: match optional(p, "truncate") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(invalid("truncate", "must be true or false")),
                },
            },
            other => return Err(RopeError::UnknownType(other.to_string())),
        };
        let config = RopeConfig {
            theta,
            head_dim,
            rotary_dim,
            max_position_embeddings,
            scaling,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that would make the frequencies meaningless.
    fn validate(&self) -> Result<()> {
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(invalid(
                "rope_theta",
                &format!("must be a number > 1, got {}", self.theta),
            ));
        }
        if self.rotary_dim == 0
            || !self.rotary_dim.is_multiple_of(2)
            || self.rotary_dim > self.head_dim
        {
            return Err(invalid(
                "partial_rotary_factor",
                &format!(
                    "gives {} rotary dimensions for head_dim {}: need an even number in 2..=head_dim",
                    self.rotary_dim, self.head_dim
                ),
            ));
        }
        if self.max_position_embeddings == 0 {
            return Err(invalid("max_position_embeddings", "must be positive"));
        }
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    name,
                    &format!("must be a positive number, got {v}"),
                ))
            }
        };
        let positive_len = |n: usize| {
            if n > 1 {
                Ok(())
            } else {
                Err(invalid(
                    "original_max_position_embeddings",
                    "must be at least 2",
                ))
            }
        };
        match &self.scaling {
            RopeScaling::Default => Ok(()),
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                positive("factor", *factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive_len(*original_max_position_embeddings)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(invalid("high_freq_factor", "must exceed low_freq_factor"));
                }
                Ok(())
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                factor,
                original_max_position_embeddings,
                ..
            } => {
                positive_len(*original_max_position_embeddings)?;
                factor.map_or(Ok(()), |f| positive("factor", f))?;
                let half = self.rotary_dim / 2;
                for (name, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if list.len() != half {
                        return Err(invalid(
                            name,
                            &format!("has {} entries; rotary_dim / 2 = {half} needed", list.len()),
                        ));
                    }
                    list.iter().try_for_each(|&v| positive(name, v))?;
                }
                Ok(())
            }
            RopeScaling::Yarn {
                factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings,
                ..
            } => {
                positive_len(*original_max_position_embeddings)?;
                factor.map_or(Ok(()), |f| positive("factor", f))?;
                positive("beta_fast", *beta_fast)?;
                positive("beta_slow", *beta_slow)
            }
        }
    }
}

fn invalid(field: &str, reason: &str) -> RopeError {
    RopeError::InvalidField {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

fn as_object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| invalid(field, "must be a JSON object"))
}

fn required<'a>(
    p: &'a Map<String, Value>,
    field: &'static str,
    rope_type: &str,
) -> Result<&'a Value> {
    optional(p, field).ok_or_else(|| RopeError::MissingField {
        rope_type: rope_type.to_string(),
        field,
    })
}

fn optional<'a>(p: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    p.get(field).filter(|v| !v.is_null())
}

fn f64_of(v: &Value, field: &str) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| invalid(field, &format!("must be a number, got {v}")))
}

fn usize_of(v: &Value, field: &str) -> Result<usize> {
    v.as_u64()
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| invalid(field, &format!("must be a non-negative integer, got {v}")))
}

fn f64_list(v: &Value, field: &str) -> Result<Vec<f64>> {
    v.as_array()
        .ok_or_else(|| invalid(field, "must be a list of numbers"))?
        .iter()
        .map(|x| f64_of(x, field))
        .collect()
}
