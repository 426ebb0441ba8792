//! Reading RoPE settings from HF configs (suite `rope`): every fixture model's config.json, the
//! legacy `rope_scaling` key, and errors that name the field at fault.

use llama_fixtures::fixtures_dir;
use llama_rope::{RopeConfig, RopeError, RopeScaling};
use serde_json::{json, Value};

#[test]
fn every_fixture_model_config_parses() {
    let dir = fixtures_dir().join("models");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path().join("config.json");
        let config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let rope = RopeConfig::from_hf_config(&config)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let heads = config["num_attention_heads"].as_u64().unwrap() as usize;
        let head_dim = config["head_dim"].as_u64().map_or(
            config["hidden_size"].as_u64().unwrap() as usize / heads,
            |d| d as usize,
        );
        assert_eq!(rope.head_dim, head_dim);
        assert_eq!(rope.rotary_dim, head_dim);
        let rope_type = config["rope_parameters"]["rope_type"]
            .as_str()
            .unwrap_or("default");
        assert_eq!(rope.scaling.rope_type(), rope_type, "{}", path.display());
        seen += 1;
    }
    assert!(seen > 0, "no model configs under {}", dir.display());
}

#[test]
fn legacy_rope_scaling_with_type_key_parses() {
    let config = json!({
        "hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 4096,
        "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}
    });
    let rope = RopeConfig::from_hf_config(&config).unwrap();
    assert_eq!(rope.theta, 500000.0);
    assert_eq!(rope.head_dim, 64);
    assert_eq!(rope.scaling, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn no_rope_keys_mean_plain_rope_with_theta_10000() {
    let config =
        json!({"hidden_size": 64, "num_attention_heads": 2, "max_position_embeddings": 128});
    let rope = RopeConfig::from_hf_config(&config).unwrap();
    assert_eq!(
        (rope.theta, rope.scaling.clone()),
        (10000.0, RopeScaling::Default)
    );
}

#[test]
fn partial_rotary_factor_sets_the_rotary_width() {
    let config = json!({"head_dim": 64, "max_position_embeddings": 128, "partial_rotary_factor": 0.5,
                        "hidden_size": 1, "num_attention_heads": 1});
    assert_eq!(RopeConfig::from_hf_config(&config).unwrap().rotary_dim, 32);
}

#[test]
fn phi3_top_level_original_context_wins() {
    let params = json!({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.0],
                        "long_factor": [2.0, 2.0], "original_max_position_embeddings": 999});
    let config = json!({"head_dim": 4, "hidden_size": 4, "num_attention_heads": 1,
                        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                        "rope_parameters": params});
    let rope = RopeConfig::from_hf_config(&config).unwrap();
    assert!(matches!(
        rope.scaling,
        RopeScaling::LongRope {
            original_max_position_embeddings: 4096,
            ..
        }
    ));
}

fn error_of(params: Value) -> String {
    RopeConfig::from_rope_parameters(&params, 8, 128)
        .unwrap_err()
        .to_string()
}

#[test]
fn invalid_settings_are_errors_naming_the_field() {
    let msg = error_of(json!({"rope_type": "linear", "rope_theta": 10000.0}));
    assert!(
        msg.contains("\"linear\"") && msg.contains("\"factor\""),
        "{msg}"
    );
    let msg = error_of(json!({"rope_type": "ntk-by-parts", "rope_theta": 10000.0}));
    assert!(msg.contains("unknown rope_type \"ntk-by-parts\""), "{msg}");
    let msg = error_of(json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": "two"}));
    assert!(msg.contains("\"factor\" must be a number"), "{msg}");
    let msg = error_of(json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": -2.0}));
    assert!(
        msg.contains("\"factor\" must be a positive number"),
        "{msg}"
    );
    let msg = error_of(json!({"rope_type": "longrope", "rope_theta": 10000.0,
                              "short_factor": [1.0], "long_factor": [1.0, 1.0, 1.0, 1.0]}));
    assert!(
        msg.contains("\"short_factor\" has 1 entries; rotary_dim / 2 = 4 needed"),
        "{msg}"
    );
    let msg = error_of(
        json!({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.1}),
    );
    assert!(msg.contains("partial_rotary_factor"), "{msg}");
    let msg = error_of(
        json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                              "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
    );
    assert!(msg.contains("high_freq_factor"), "{msg}");
    let msg = error_of(json!({"rope_type": "default"}));
    assert!(msg.contains("\"rope_theta\""), "{msg}");
    assert!(matches!(
        RopeConfig::from_rope_parameters(&json!([1, 2]), 8, 128),
        Err(RopeError::InvalidField { .. })
    ));
}
