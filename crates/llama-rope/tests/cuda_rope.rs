//! The CUDA rope kernel against the CPU path (suite `rope`), bit for bit, for every RoPE kind of
//! the fixtures (and a head size the kernels cannot pack), in f32 and bf16, forward and backward;
//! the position ids the device tables keep between launches. Skipped, counted, without a GPU.

use llama_core::bf16;
use llama_fixtures::{cuda_or_skip, fixtures_dir, TestRng};
use llama_rope::cuda::{self, DeviceTables, RopeElement};
use llama_rope::{apply, apply_backward, QkShape, RopeConfig, RotaryEmbedding};
use serde_json::Value;

fn fixture_configs() -> Vec<(String, RopeConfig, usize)> {
    let path = fixtures_dir().join("rope/cases.json");
    let list: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    list.iter()
        .map(|c| {
            let size = |k: &str| c[k].as_u64().unwrap() as usize;
            let config = RopeConfig::from_rope_parameters(
                &c["rope_parameters"],
                size("head_dim"),
                size("max_position_embeddings"),
            )
            .unwrap();
            (
                c["name"].as_str().unwrap().to_string(),
                config,
                size("seq_len"),
            )
        })
        .collect()
}

/// x [batch, heads, seq, head_dim] moved to [batch, seq, heads, head_dim], or back (`back`).
fn swap_layout<T: Copy>(x: &[T], shape: QkShape, back: bool) -> Vec<T> {
    let (b, h, t, d) = (shape.batch, shape.heads, shape.seq, shape.head_dim);
    let mut out = x.to_vec();
    for (bi, hi, ti) in
        (0..b).flat_map(|bi| (0..h).flat_map(move |hi| (0..t).map(move |ti| (bi, hi, ti))))
    {
        let head_major = ((bi * h + hi) * t + ti) * d;
        let token_major = ((bi * t + ti) * h + hi) * d;
        let (from, to) = if back {
            (token_major, head_major)
        } else {
            (head_major, token_major)
        };
        out[to..to + d].copy_from_slice(&x[from..from + d]);
    }
    out
}

/// CPU and GPU results of one rotation (in place; the fused head split and merge, which must
/// give the same bits in their layouts, are checked here too).
fn both<T: RopeElement>(
    gpu: &std::sync::Arc<llama_core::cuda::CudaDevice>,
    x: &[T],
    shape: QkShape,
    rope: &mut RotaryEmbedding,
    table_len: usize,
    ids: &[u32],
    backward: bool,
) -> (Vec<T>, Vec<T>) {
    let tables = rope.tables(table_len).unwrap();
    let mut cpu = x.to_vec();
    if backward {
        apply_backward(&mut cpu, shape, &tables, ids).unwrap();
    } else {
        apply(&mut cpu, shape, &tables, ids).unwrap();
    }
    let device_tables = DeviceTables::upload(gpu, &tables).unwrap();
    let mut on_gpu = gpu.htod(x).unwrap();
    cuda::apply(&mut on_gpu, shape, &device_tables, ids, backward).unwrap();
    let in_place = gpu.dtoh(&on_gpu).unwrap();
    let bits = |v: &[T]| v.iter().map(|e| e.to_f32().to_bits()).collect::<Vec<_>>();
    for to_heads in [true, false] {
        let src = if to_heads {
            swap_layout(x, shape, false)
        } else {
            x.to_vec()
        };
        let mut moved = gpu.zeros::<T>(x.len()).unwrap();
        cuda::apply_moving(
            &gpu.htod(&src).unwrap(),
            &mut moved,
            shape,
            &device_tables,
            ids,
            backward,
            to_heads,
        )
        .unwrap();
        let moved = gpu.dtoh(&moved).unwrap();
        let head_major = if to_heads {
            moved
        } else {
            swap_layout(&moved, shape, true)
        };
        assert_eq!(
            bits(&head_major),
            bits(&in_place),
            "moving, to_heads={to_heads}"
        );
    }
    (cpu, in_place)
}

#[test]
fn kernel_matches_cpu_for_every_kind() {
    let Some(gpu) = cuda_or_skip!() else { return };
    // Beside the fixtures' head sizes (whole 16-byte packs), one whose halves are not: the
    // kernels' element-by-element path.
    let awkward = RopeConfig::new(10000.0, 12, 64).unwrap();
    let configs = fixture_configs()
        .into_iter()
        .chain([("head_dim 12".to_string(), awkward, 64)]);
    for (name, config, seq_len) in configs {
        let shape = QkShape {
            batch: 2,
            heads: 3,
            seq: 37,
            head_dim: config.head_dim,
        };
        let mut rng = TestRng::new(seq_len as u64);
        let ids: Vec<u32> = (0..shape.batch * shape.seq)
            .map(|_| (rng.next_u64() % seq_len as u64) as u32)
            .collect();
        let x = rng.vec(shape.len(), 2.0);
        let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut rope = RotaryEmbedding::new(config);
        for backward in [false, true] {
            let (cpu, dev) = both(&gpu, &x, shape, &mut rope, seq_len, &ids, backward);
            assert!(
                cpu.iter()
                    .zip(&dev)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} f32 backward={backward}"
            );
            let (cpu, dev) = both(&gpu, &x16, shape, &mut rope, seq_len, &ids, backward);
            assert!(
                cpu.iter()
                    .zip(&dev)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} bf16 backward={backward}"
            );
        }
    }
}

#[test]
fn large_inputs_cover_the_grid_stride_loop() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let config = fixture_configs()
        .into_iter()
        .find(|(_, c, _)| c.head_dim == 128)
        .map(|(_, c, _)| c)
        .unwrap();
    // 2 · 32 · 4500 = 288,000 rows of 64 pairs: more than the 65,535 blocks × 4 rows of one grid.
    let shape = QkShape {
        batch: 2,
        heads: 32,
        seq: 4500,
        head_dim: 128,
    };
    let x = TestRng::new(9).vec(shape.len(), 1.0);
    let ids: Vec<u32> = (0..shape.seq as u32).collect();
    let mut rope = RotaryEmbedding::new(config);
    let (cpu, dev) = both(&gpu, &x, shape, &mut rope, shape.seq, &ids, false);
    assert!(cpu
        .iter()
        .zip(&dev)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn positions_past_the_device_tables_are_errors() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let config = RopeConfig::new(10000.0, 8, 64).unwrap();
    let mut rope = RotaryEmbedding::new(config);
    let tables = rope.tables(16).unwrap();
    let device_tables = DeviceTables::upload(&gpu, &tables).unwrap();
    let shape = QkShape {
        batch: 1,
        heads: 1,
        seq: 2,
        head_dim: 8,
    };
    let mut x = gpu.htod(&[0.0f32; 16]).unwrap();
    let err = cuda::apply(&mut x, shape, &device_tables, &[3, 99_999], false).unwrap_err();
    assert!(err.to_string().contains("position 99999"), "{err}");
}

/// The device tables keep the last launch's position ids on the device: a launch at other
/// positions must rotate by those, not by the kept ones (and the kept ones again after).
#[test]
fn new_positions_on_the_same_device_tables_are_used() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let config = RopeConfig::new(10000.0, 8, 64).unwrap();
    let mut rope = RotaryEmbedding::new(config);
    let tables = rope.tables(64).unwrap();
    let device_tables = DeviceTables::upload(&gpu, &tables).unwrap();
    let shape = QkShape {
        batch: 1,
        heads: 2,
        seq: 5,
        head_dim: 8,
    };
    let x = TestRng::new(3).vec(shape.len(), 1.0);
    let first: Vec<u32> = (0..5).collect();
    let later: Vec<u32> = (40..45).collect();
    for ids in [&first, &later, &first] {
        let mut cpu = x.clone();
        apply(&mut cpu, shape, &tables, ids).unwrap();
        let mut on_gpu = gpu.htod(&x).unwrap();
        cuda::apply(&mut on_gpu, shape, &device_tables, ids, false).unwrap();
        let dev = gpu.dtoh(&on_gpu).unwrap();
        assert!(
            cpu.iter()
                .zip(&dev)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "positions {ids:?}"
        );
    }
}
