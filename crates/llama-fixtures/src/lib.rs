//! # llama-fixtures
//!
//! Test support shared by every fastllama crate (a dev-dependency only):
//! - [`Fixture`]: the HF transformers / peft reference numbers in `$LLAMA_FIXTURES` (a
//!   `.safetensors` file of tensors beside a `.json` of settings), read without Python;
//! - [`assert_close`]: relative-error comparison, ‖actual − expected‖ / ‖expected‖, whose
//!   failure message names the tensor, its shape, the worst element and where it is;
//! - [`params`]: the tunable test parameters that `cargo xtask test --set key=value` passes;
//! - [`cuda_or_skip`]: the CUDA device for a GPU test, or a counted skip where there is none.
//!
//! Tests take every size from the fixture files, never from constants: the same tests run on
//! other fixture sets with other shapes.

mod compare;
mod fixture;
pub mod params;
mod rng;
mod skip;

pub use compare::{assert_close, check_close, rel_error, to_f32, to_f64, Mismatch};
pub use fixture::{fixture_names, fixtures_dir, Fixture, FIXTURES_ENV};
pub use params::{param, Suite};
pub use rng::TestRng;
pub use skip::{cuda_device_or_skip, SKIP_LOG_ENV};
