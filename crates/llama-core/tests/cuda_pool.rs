//! The device memory pool's counters (suite `core`), in a test binary of their own so that no
//! other test allocates from the pool while they are read; skips, counted, without a GPU.

use llama_fixtures::cuda_or_skip;

/// The memory pool's counters follow an allocation: in use while it lives, back after it is
/// freed, the watermark at least its size until restarted and below it after.
#[test]
fn the_memory_pool_counts_what_it_hands_out() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let Some(before) = gpu.pool_in_use().unwrap() else {
        return; // a device without a stream-ordered pool counts nothing
    };
    let n = 64 << 20;
    gpu.reset_peak().unwrap();
    let buffer = gpu.zeros::<u8>(n).unwrap();
    gpu.synchronize().unwrap();
    let during = gpu.pool_in_use().unwrap().unwrap();
    assert!(
        during >= before + n,
        "{during} in use, {before} + {n} expected"
    );
    drop(buffer);
    gpu.synchronize().unwrap();
    let after = gpu.pool_in_use().unwrap().unwrap();
    assert!(
        after + n <= during,
        "{after} still in use after freeing {n} of {during}"
    );
    assert!(gpu.pool_peak().unwrap().unwrap() >= during);
    gpu.reset_peak().unwrap();
    let small = gpu.zeros::<u8>(1 << 20).unwrap();
    gpu.synchronize().unwrap();
    let peak = gpu.pool_peak().unwrap().unwrap();
    assert!(
        peak < during,
        "the restarted watermark {peak} still counts {during}"
    );
    drop(small);
}
