//! Helpers shared by the attention test files.

use llama_attn::{AttentionConfig, LlamaAttention};
use llama_fixtures::TestRng;
use llama_rope::RopeConfig;

/// An attention layer with random weights (uniform in ±0.3), head_dim = hidden / heads and a
/// default RoPE (θ = 10000) trained for `max_positions`.
pub fn random_layer(
    rng: &mut TestRng,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    max_positions: usize,
) -> LlamaAttention {
    let d = hidden / heads;
    let config = AttentionConfig::new(hidden, heads, kv_heads, d).unwrap();
    let mut w = |rows: usize| rng.vec(rows * hidden, 0.3);
    let (q, k, v, o) = (w(heads * d), w(kv_heads * d), w(kv_heads * d), w(hidden));
    LlamaAttention::new(
        config,
        q,
        k,
        v,
        o,
        RopeConfig::new(10000.0, d, max_positions).unwrap(),
    )
    .unwrap()
}
