//! CUDA kernels against the CPU path (suite `core`); each test skips, counted, without a GPU.

use llama_core::cuda::{HostStash, KernelSource};
use llama_core::{bf16, cache_dir, DType, Device, Error, Tensor};
use llama_fixtures::{cuda_or_skip, TestRng};

/// Awkward lengths: empty, single, not a multiple of the block, and more than one grid's worth.
const LENGTHS: [usize; 6] = [0, 1, 255, 257, 100_003, 3_000_001];

fn random(n: usize, seed: u64) -> Tensor {
    Tensor::from_vec(TestRng::new(seed).vec(n, 100.0), n).unwrap()
}

fn bits(t: &Tensor) -> Vec<u16> {
    match t.dtype() {
        DType::BF16 => t
            .to_vec::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::F16 => t
            .to_vec::<half::f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        other => panic!("not a 16-bit dtype: {other}"),
    }
}

#[test]
fn upload_download_round_trip() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let device = Device::Cuda(gpu.ordinal());
    for (seed, &n) in LENGTHS.iter().enumerate() {
        let host = random(n, seed as u64);
        let back = host
            .to_device(device)
            .unwrap()
            .to_device(Device::Cpu)
            .unwrap();
        assert_eq!(
            back.to_vec::<f32>().unwrap(),
            host.to_vec::<f32>().unwrap(),
            "n = {n}"
        );
    }
}

#[test]
fn add_matches_cpu_bit_for_bit() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let device = Device::Cuda(gpu.ordinal());
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (seed, &n) in LENGTHS.iter().enumerate() {
            let a = random(n, 2 * seed as u64).to_dtype(dtype).unwrap();
            let b = random(n, 2 * seed as u64 + 1).to_dtype(dtype).unwrap();
            let cpu = a.add(&b).unwrap().to_vec_f32().unwrap();
            let (ga, gb) = (a.to_device(device).unwrap(), b.to_device(device).unwrap());
            let gpu_sum = ga.add(&gb).unwrap();
            assert_eq!(gpu_sum.device(), device);
            let gpu_sum = gpu_sum.to_vec_f32().unwrap();
            assert!(
                cpu.iter()
                    .zip(&gpu_sum)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "add {dtype} n = {n}: GPU differs from CPU"
            );
        }
    }
}

#[test]
fn casts_match_cpu_bit_for_bit() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let device = Device::Cuda(gpu.ordinal());
    let floats = [DType::F32, DType::F16, DType::BF16];
    for src in floats {
        for dst in floats {
            let host = random(100_003, 7).to_dtype(src).unwrap();
            let cpu = host.to_dtype(dst).unwrap();
            let gpu_cast = host.to_device(device).unwrap().to_dtype(dst).unwrap();
            let gpu_cast = gpu_cast.to_device(Device::Cpu).unwrap();
            assert_eq!(gpu_cast.dtype(), dst);
            if dst == DType::F32 {
                assert_eq!(
                    gpu_cast.to_vec::<f32>().unwrap(),
                    cpu.to_vec::<f32>().unwrap()
                );
            } else {
                assert_eq!(bits(&gpu_cast), bits(&cpu), "cast {src} -> {dst}");
            }
        }
    }
}

#[test]
fn special_values_cast_like_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let special = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0xffc1_2345),
        1e-40,
        65520.0,
        -65504.0,
        3.0e38,
        1.0 + f32::EPSILON,
        f32::MIN_POSITIVE,
    ];
    let host = Tensor::from_slice(&special, special.len()).unwrap();
    let device = Device::Cuda(gpu.ordinal());
    for dst in [DType::F16, DType::BF16] {
        let cpu = host.to_dtype(dst).unwrap();
        let gpu_cast = host.to_device(device).unwrap().to_dtype(dst).unwrap();
        assert_eq!(
            bits(&gpu_cast.to_device(Device::Cpu).unwrap()),
            bits(&cpu),
            "{dst}"
        );
    }
}

#[test]
fn compiled_kernels_are_cached_on_disk() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let t = random(10, 1)
        .to_device(Device::Cuda(gpu.ordinal()))
        .unwrap();
    t.add(&t).unwrap();
    let dir = cache_dir().join("kernels");
    let prefix = format!("elementwise-{}-", gpu.arch());
    let cached = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
    assert!(cached, "no {prefix}*.cubin in {}", dir.display());
}

#[test]
fn a_kernel_that_does_not_compile_returns_the_log() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let broken = KernelSource {
        name: "broken_for_test",
        code: "extern \"C\" __global__ void f(float* x) { x[0] = undefined_name; }",
    };
    let err = gpu.function(&broken, "f").unwrap_err();
    assert!(matches!(err, Error::KernelCompile { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("broken_for_test") && msg.contains("undefined_name"),
        "{msg}"
    );
}

/// A host stash gives back, bit for bit, what was put into each slot, while the device's
/// stream frees each put buffer as soon as its transfer is dropped and the pool hands that
/// memory straight out again to be overwritten; a slot put again holds the new buffer, its
/// pinned memory grown for a longer one and kept for a shorter one; a slot never put into is
/// an error.
#[test]
fn a_host_stash_gives_back_what_was_put() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut stash = HostStash::<f32>::new(&gpu).unwrap();
    let lens = [1, 257, 100_003, 3_000_001];
    let mut values: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| TestRng::new(40 + i as u64).vec(n, 100.0))
        .collect();
    let scribble = |n: usize| gpu.zeros::<f32>(n).unwrap();
    for (i, v) in values.iter().enumerate() {
        drop(stash.put(i, gpu.htod(v).unwrap()).unwrap());
        drop(scribble(v.len()));
    }
    // Slot 1 grows; slot 3 keeps its memory for a shorter buffer.
    values[1] = TestRng::new(50).vec(99_999, 1.0);
    values[3] = TestRng::new(51).vec(1_000, 1.0);
    for i in [1, 3] {
        let transfer = stash.put(i, gpu.htod(&values[i]).unwrap()).unwrap();
        assert_eq!(gpu.dtoh(transfer.buffer()).unwrap(), values[i]);
    }
    let held = (1 + 99_999 + 100_003 + 3_000_001) * 4;
    assert_eq!(stash.host_bytes(), held);
    for (i, v) in values.iter().enumerate().rev() {
        let back = stash.get(i).unwrap().wait().unwrap();
        let _overwritten = scribble(v.len());
        assert_eq!(&gpu.dtoh(&back).unwrap(), v, "slot {i}");
    }
    let empty = stash.get(lens.len() + 2).err();
    assert!(matches!(empty, Some(Error::EmptyStashSlot(6))), "{empty:?}");
}
