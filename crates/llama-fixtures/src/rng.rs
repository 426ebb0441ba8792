//! A small deterministic generator for test inputs (splitmix64), so that a failing case can be
//! rerun from its seed without another dependency.

use llama_core::SplitMix64;

/// Deterministic pseudo-random numbers from a 64-bit seed.
pub struct TestRng(SplitMix64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(SplitMix64::new(seed))
    }

    /// The next 64 random bits (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}
