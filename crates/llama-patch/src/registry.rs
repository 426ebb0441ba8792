//! The registry: for every op of the model, the implementations that exist and where each
//! lives. The policy ([`crate::pre_patch`]) picks among these; the report names them.

use std::fmt;

use llama_core::Kernel;

/// One implementation of an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Impl {
    /// The formula in f64 loops (each crate's `reference` module).
    Reference,
    /// SIMD and rayon on the host.
    CpuFast,
    /// A CUDA kernel (NVRTC) or cuBLAS.
    Cuda,
}

impl Impl {
    /// The CPU kernel that runs this implementation's arithmetic on the host.
    pub fn kernel(self) -> Kernel {
        match self {
            Impl::Reference => Kernel::Reference,
            Impl::CpuFast | Impl::Cuda => Kernel::Fast,
        }
    }
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Impl::Reference => "reference",
            Impl::CpuFast => "CPU fast",
            Impl::Cuda => "CUDA",
        })
    }
}

/// The ops a plan assigns an implementation to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    RmsNorm,
    Rope,
    Attention,
    /// The frozen products x·Wᵀ (dense or quantised weights) and their input gradients.
    Projections,
    /// The gated activation act(gate) ⊙ up.
    Activation,
    CrossEntropy,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::RmsNorm,
        Op::Rope,
        Op::Attention,
        Op::Projections,
        Op::Activation,
        Op::CrossEntropy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::RmsNorm => "rms_norm",
            Op::Rope => "rope",
            Op::Attention => "attention",
            Op::Projections => "projections",
            Op::Activation => "activation",
            Op::CrossEntropy => "cross_entropy",
        }
    }

    /// Where `imp` of this op lives, for the report.
    pub fn implementation(self, imp: Impl) -> &'static str {
        match (self, imp) {
            (Op::RmsNorm, Impl::Reference) => "llama_ops::reference::rms_norm",
            (Op::RmsNorm, Impl::CpuFast) => "llama_ops::rms_norm (SIMD rows, rayon)",
            (Op::RmsNorm, Impl::Cuda) => "kernels/norm.cu",
            (Op::Rope, Impl::Reference) => "llama_rope::reference::apply (HF's rotate_half)",
            (Op::Rope, Impl::CpuFast) => "llama_rope::apply (cached cos/sin tables)",
            (Op::Rope, Impl::Cuda) => "kernels/rope.cu",
            (Op::Attention, Impl::Reference) => "llama_attn::reference (whole score matrix)",
            (Op::Attention, Impl::CpuFast) => "llama_attn::flash (tiled online softmax)",
            (Op::Attention, Impl::Cuda) => "kernels/attention.cu (flash tiles, cuBLAS backward)",
            (Op::Projections, Impl::Reference) => "llama_ops::reference::linear (dequantised)",
            (Op::Projections, Impl::CpuFast) => {
                "llama_ops::Weight (GEMM; fused dequantise-and-dot for quantised weights)"
            }
            (Op::Projections, Impl::Cuda) => "cuBLAS bf16 GEMM (NF4 dequantised per product)",
            (Op::Activation, Impl::Reference) => "llama_ops::reference::gated_forward",
            (Op::Activation, Impl::CpuFast) => "llama_ops::gated_forward (SIMD, rayon)",
            (Op::Activation, Impl::Cuda) => "kernels/activation.cu",
            (Op::CrossEntropy, Impl::Reference) => "llama_ops::reference::cross_entropy",
            (Op::CrossEntropy, Impl::CpuFast) => "llama_ops::cross_entropy (chunked logsumexp)",
            (Op::CrossEntropy, Impl::Cuda) => "kernels/cross_entropy.cu (chunked)",
        }
    }
}
