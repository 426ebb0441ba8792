//! Which implementation of an op runs on the CPU: the plain reference (the spec, f64 loops) or
//! the fast one (SIMD, threads). llama-patch decides, per layer and op; the ops obey.

use std::fmt;

/// The implementation an op runs with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// The formula in f64 loops, obviously right and slow.
    Reference,
    /// The optimised implementation (SIMD, threads, fused passes).
    #[default]
    Fast,
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernel::Reference => "reference",
            Kernel::Fast => "fast",
        })
    }
}
