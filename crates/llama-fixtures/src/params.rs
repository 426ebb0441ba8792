//! The tunable test parameters of the guide's suites.
//!
//! `cargo xtask test --set seq_len=1024` exports `FASTLLAMA_TEST_SEQ_LEN=1024`; a test reads it
//! with [`param`], which falls back to the suite's default. This file has no dependencies:
//! `xtask` includes it by path, so the list it prints (`--list`) and validates (`--set`) is the
//! one the tests read.

/// A test suite of `cargo xtask test --suite …`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Core,
    Rope,
    Attention,
    Optimization,
    FastModel,
    Integration,
}

impl Suite {
    /// Every suite, in the order they run.
    pub const ALL: [Suite; 6] = [
        Suite::Core,
        Suite::Rope,
        Suite::Attention,
        Suite::Optimization,
        Suite::FastModel,
        Suite::Integration,
    ];

    /// The name used on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Suite::Core => "core",
            Suite::Rope => "rope",
            Suite::Attention => "attention",
            Suite::Optimization => "optimization",
            Suite::FastModel => "fast-model",
            Suite::Integration => "integration",
        }
    }

    /// The suite with this command-line name.
    pub fn from_name(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A tunable parameter with its default in each suite that reads it.
pub struct Param {
    pub name: &'static str,
    pub help: &'static str,
    pub defaults: &'static [(Suite, usize)],
}

/// Every tunable parameter (the guide's names and defaults).
pub const PARAMS: &[Param] = &[
    Param {
        name: "dim",
        help: "RoPE head dimension (the guide tries 32, 64, 128)",
        defaults: &[(Suite::Rope, 32)],
    },
    Param {
        name: "max_position_embeddings",
        help: "trained context of the RoPE config (2048, 4096, 8192)",
        defaults: &[(Suite::Rope, 2048)],
    },
    Param {
        name: "seq_len",
        help: "sequence length (RoPE: 128 … 1024 and 100000+; attention: 64; ops: token rows)",
        defaults: &[
            (Suite::Rope, 128),
            (Suite::Attention, 64),
            (Suite::Optimization, 7),
        ],
    },
    Param {
        name: "batch_size",
        help: "sequences per batch in the attention tests",
        defaults: &[(Suite::Attention, 2)],
    },
    Param {
        name: "hidden_size",
        help: "model width (attention tests: 32; ops: SmolLM2's 576)",
        defaults: &[(Suite::Attention, 32), (Suite::Optimization, 576)],
    },
    Param {
        name: "intermediate_size",
        help: "MLP width of the ops tests (SmolLM2: 1536; Llama-3-8B: 14336)",
        defaults: &[(Suite::Optimization, 1536)],
    },
    Param {
        name: "vocab_size",
        help: "vocabulary of the cross-entropy and lm_head tests (SmolLM2: 49152)",
        defaults: &[(Suite::Optimization, 49152)],
    },
    Param {
        name: "num_heads",
        help: "attention heads (must divide hidden_size)",
        defaults: &[(Suite::Attention, 4)],
    },
];

/// Environment variable prefix: `dim` is read from `FASTLLAMA_TEST_DIM`.
pub const PARAM_ENV_PREFIX: &str = "FASTLLAMA_TEST_";

/// The environment variable that carries parameter `name`.
pub fn env_name(name: &str) -> String {
    format!("{PARAM_ENV_PREFIX}{}", name.to_ascii_uppercase())
}

/// The parameter with this name.
pub fn lookup(name: &str) -> Option<&'static Param> {
    PARAMS.iter().find(|p| p.name == name)
}

/// The value of parameter `name` for a test of `suite`: the environment's, else the suite's
/// default. Panics (failing the test) on an unknown name, a suite without a default, or a value
/// that is not a non-negative integer.
pub fn param(name: &str, suite: Suite) -> usize {
    let param = lookup(name).unwrap_or_else(|| panic!("unknown test parameter {name:?}"));
    if let Ok(value) = std::env::var(env_name(name)) {
        return value.trim().parse().unwrap_or_else(|_| {
            panic!("{}={value:?} is not a non-negative integer", env_name(name))
        });
    }
    param
        .defaults
        .iter()
        .find(|(s, _)| *s == suite)
        .map(|&(_, v)| v)
        .unwrap_or_else(|| panic!("parameter {name} has no default for suite {}", suite.name()))
}
