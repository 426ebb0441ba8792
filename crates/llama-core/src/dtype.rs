//! Element types: IEEE floats and the block-quantised kinds of GGUF and bitsandbytes.

use std::fmt;

/// The dtype of a tensor's storage.
///
/// Float kinds hold one value per element. Block-quantised kinds hold `block_len()` elements in
/// `block_bytes()` bytes (the layouts of ggml's `block_q4_0` … `block_q6_K` and of bitsandbytes'
/// NF4 with one f32 absmax per block); their arithmetic lives in `llama-ops`, here they are
/// opaque bytes with a known size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// ggml Q4_0: 32 weights, f16 scale d, w = d·(q − 8).
    Q4_0,
    /// ggml Q4_1: 32 weights, f16 scale d and min m, w = d·q + m.
    Q4_1,
    /// ggml Q8_0: 32 weights, f16 scale d, w = d·q with q an i8.
    Q8_0,
    /// ggml Q4_K: super-blocks of 256 with 6-bit sub-block scales and mins.
    Q4K,
    /// ggml Q5_K: like Q4_K with a fifth bit per weight.
    Q5K,
    /// ggml Q6_K: super-blocks of 256, 6-bit weights, i8 sub-block scales.
    Q6K,
    /// bitsandbytes NF4: 64 weights as 4-bit codes into the NF4 table, one f32 absmax.
    Nf4,
}

impl DType {
    /// Every dtype, for iteration in tests and parsers.
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::Nf4,
    ];

    /// Elements per storage block: 1 for floats.
    pub const fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q8_0 => 32,
            DType::Q4K | DType::Q5K | DType::Q6K => 256,
            DType::Nf4 => 64,
        }
    }

    /// Bytes per storage block (ggml's `sizeof(block_*)`; NF4: 32 code bytes + f32 absmax).
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 2 + 16,
            DType::Q4_1 => 2 + 2 + 16,
            DType::Q8_0 => 2 + 32,
            DType::Q4K => 2 + 2 + 12 + 128,
            DType::Q5K => 2 + 2 + 12 + 32 + 128,
            DType::Q6K => 128 + 64 + 16 + 2,
            DType::Nf4 => 32 + 4,
        }
    }

    /// True for the IEEE float kinds, which hold one value per element.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Bytes needed for `elems` elements, or `None` when `elems` is not a whole number of
    /// blocks or the size overflows.
    pub fn storage_bytes(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_len()) {
            return None;
        }
        (elems / self.block_len()).checked_mul(self.block_bytes())
    }

    /// The name used in files and messages (safetensors' names for floats, ggml's for blocks).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q8_0 => "Q8_0",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
            DType::Nf4 => "NF4",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
