//! `RotaryEmbedding`: the cos/sin tables of one RoPE config, grown in whole blocks.
//!
//! Like Unsloth's `extend_rope_embedding`, the tables cover the longest sequence seen so far,
//! rounded up to a multiple of [`CACHE_BLOCK`] positions, and grow only when a longer sequence
//! arrives (computing just the new rows); nothing is recomputed per call. They hold d/2 columns
//! (cos and sin of the first half repeat in the second), already multiplied by the attention
//! scaling, so memory is 2 · 4 · (d/2) bytes per position, linear in the length.

use rayon::prelude::*;

use crate::config::RopeConfig;
use crate::freqs::Frequencies;
use crate::{Result, RopeError};

/// Positions added per growth step (Unsloth extends its cache in multiples of 8192).
pub const CACHE_BLOCK: usize = 8192;

/// Positions are converted to f32 as HF does; beyond 2^24 they are no longer exact.
pub const MAX_POSITIONS: usize = 1 << 24;

/// cos/sin rows for positions `0..len`: `cos[p · half + i] = s · cos(p · inv_freq[i])`.
#[derive(Clone, Copy, Debug)]
pub struct RopeTables<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// d/2: columns per row.
    pub half: usize,
    /// Rows (positions) covered.
    pub len: usize,
}

impl RopeTables<'_> {
    /// HF's full-width cos and sin, [positions.len(), d] (the d/2 columns twice), for comparison
    /// with reference numbers.
    pub fn full_rows(&self, positions: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in positions {
            if p >= self.len {
                return Err(out_of_range(p, self.len));
            }
            let row = p * self.half..(p + 1) * self.half;
            for _ in 0..2 {
                cos.extend_from_slice(&self.cos[row.clone()]);
                sin.extend_from_slice(&self.sin[row.clone()]);
            }
        }
        Ok((cos, sin))
    }
}

/// The rotary embedding of one config with its growing cos/sin cache.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    config: RopeConfig,
    regime: usize,
    freqs: Frequencies,
    cos: Vec<f32>,
    sin: Vec<f32>,
    len: usize,
    /// Bumped whenever the tables change, so device copies know when to refresh.
    generation: u64,
}

impl RotaryEmbedding {
    /// An embedding with an empty cache.
    pub fn new(config: RopeConfig) -> RotaryEmbedding {
        RotaryEmbedding {
            regime: config.frequency_regime(0),
            freqs: config.frequencies(0),
            config,
            cos: Vec::new(),
            sin: Vec::new(),
            len: 0,
            generation: 0,
        }
    }

    /// The config.
    pub fn config(&self) -> &RopeConfig {
        &self.config
    }

    /// The frequencies the tables were built from.
    pub fn frequencies(&self) -> &Frequencies {
        &self.freqs
    }

    /// Positions the cache covers now.
    pub fn cached_positions(&self) -> usize {
        self.len
    }

    /// Bytes held by the tables.
    pub fn memory_bytes(&self) -> usize {
        (self.cos.capacity() + self.sin.capacity()) * std::mem::size_of::<f32>()
    }

    /// Increases whenever the tables are rebuilt or grown.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The tables for a sequence of `seq_len` positions (positions `0..seq_len`), growing the
    /// cache when needed. Dynamic NTK and LongRoPE take their frequencies from `seq_len`, as
    /// HF does for one call; when those change, the tables are rebuilt.
    pub fn tables(&mut self, seq_len: usize) -> Result<RopeTables<'_>> {
        self.ensure(seq_len)?;
        let half = self.config.rotary_dim / 2;
        Ok(RopeTables {
            cos: &self.cos[..seq_len * half],
            sin: &self.sin[..seq_len * half],
            half,
            len: seq_len,
        })
    }

    fn ensure(&mut self, seq_len: usize) -> Result<()> {
        if seq_len > MAX_POSITIONS {
            return Err(RopeError::Shape {
                op: "tables",
                reason: format!(
                    "{seq_len} positions requested; at most {MAX_POSITIONS} are exact in f32"
                ),
            });
        }
        let regime = self.config.frequency_regime(seq_len);
        if regime != self.regime {
            self.regime = regime;
            self.freqs = self.config.frequencies(seq_len);
            self.cos.clear();
            self.sin.clear();
            self.len = 0;
            self.generation += 1;
        }
        if seq_len > self.len {
            let new_len = seq_len.div_ceil(CACHE_BLOCK) * CACHE_BLOCK;
            self.grow(new_len.min(MAX_POSITIONS));
        }
        Ok(())
    }

    /// Appends rows `self.len..new_len`.
    fn grow(&mut self, new_len: usize) {
        let half = self.config.rotary_dim / 2;
        let start = self.len;
        self.cos.reserve_exact((new_len - start) * half);
        self.sin.reserve_exact((new_len - start) * half);
        self.cos.resize(new_len * half, 0.0);
        self.sin.resize(new_len * half, 0.0);
        let Frequencies {
            inv_freq,
            attention_scaling,
        } = &self.freqs;
        self.cos[start * half..]
            .par_chunks_mut(half)
            .zip(self.sin[start * half..].par_chunks_mut(half))
            .enumerate()
            .for_each(|(row, (cos, sin))| {
                fill_row(start + row, inv_freq, *attention_scaling, cos, sin);
            });
        self.len = new_len;
        self.generation += 1;
    }
}

/// One table row: angle = f32(p) · inv_freq[i] in f32 (as HF's float32 matmul of position and
/// frequency), cos and sin rounded to f32, then times the attention scaling.
pub(crate) fn fill_row(
    position: usize,
    inv_freq: &[f32],
    scaling: f32,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    let p = position as f32;
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let angle = f64::from(p * f);
        *c = angle.cos() as f32 * scaling;
        *s = angle.sin() as f32 * scaling;
    }
}

pub(crate) fn out_of_range(position: usize, len: usize) -> RopeError {
    RopeError::Shape {
        op: "positions",
        reason: format!("position {position} is outside the {len} positions of the tables"),
    }
}
