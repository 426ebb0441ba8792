//! The CUDA attention kernels against the CPU path (suite `attention`): forward and backward on
//! grouped-query shapes with causal and padding masks, queries that are a suffix of the keys, a
//! key stride past the keys (a cache), split-K decoding over long contexts, head dims that do
//! not fill a warp's lanes, and bf16 tensors. Skipped, and counted, without a GPU.

mod common;

use cudarc::driver::CudaSlice;
use llama_attn::cuda::AttnOutput;
use llama_attn::cuda::CudaKvCache;
use llama_attn::{cuda, AttnShape, CudaLlamaAttention, KvCache, Mask};
use llama_core::bf16;
use llama_core::cuda::CudaDevice;
use llama_fixtures::{assert_close, cuda_or_skip, TestRng};

/// (shape, causal, padded)
fn cases() -> Vec<(AttnShape, bool, bool)> {
    let s = |batch, heads, kv_heads, seq_q, seq_k, kv_stride, head_dim| AttnShape {
        batch,
        heads,
        kv_heads,
        seq_q,
        seq_k,
        kv_stride,
        head_dim,
    };
    vec![
        (s(2, 4, 2, 37, 37, 37, 16), true, false),
        (s(1, 9, 3, 130, 130, 130, 64), true, true),
        (s(2, 8, 8, 5, 70, 96, 128), true, true),
        (s(1, 3, 1, 17, 17, 20, 200), false, false),
        (s(3, 6, 2, 1, 3001, 3100, 128), true, true),
        (s(1, 32, 8, 1, 513, 513, 128), true, false),
        // Tensor-core prefill shapes (bf16 at head_dim 64 and 128): partial row and key tiles.
        (s(2, 4, 2, 150, 150, 150, 64), true, true),
        (s(1, 8, 2, 70, 200, 210, 128), true, false),
        (s(1, 2, 1, 64, 64, 64, 128), false, false),
    ]
}

#[test]
fn forward_and_backward_match_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(3);
    for (s, causal, padded) in cases() {
        let name = format!("{s:?} causal={causal} padded={padded}");
        let padding: Vec<usize> = (0..s.batch)
            .map(|b| {
                if padded {
                    (b * 7) % (s.seq_k / 2 + 1)
                } else {
                    0
                }
            })
            .collect();
        let mask = Mask {
            causal,
            padding: padded.then_some(&padding[..]),
        };
        let (q, k, v, dout) = (
            rng.vec(s.q_len(), 2.0),
            rng.vec(s.kv_len(), 2.0),
            rng.vec(s.kv_len(), 1.0),
            rng.vec(s.q_len(), 1.0),
        );
        let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
        llama_attn::forward(&q, &k, &v, &s, &mask, &mut out, &mut lse).unwrap();
        let (qd, kd, vd) = (
            gpu.htod(&q).unwrap(),
            gpu.htod(&k).unwrap(),
            gpu.htod(&v).unwrap(),
        );
        let (mut od, mut ld) = (
            gpu.zeros::<f32>(s.q_len()).unwrap(),
            gpu.zeros::<f32>(s.q_rows()).unwrap(),
        );
        cuda::forward(&gpu, &qd, &kd, &vd, &s, &mask, &mut od, &mut ld).unwrap();
        assert_close(
            &format!("out {name}"),
            &gpu.dtoh(&od).unwrap(),
            &out,
            &[s.q_len()],
            1e-5,
        );
        let finite = |v: Vec<f32>| {
            v.into_iter()
                .map(|x| if x.is_finite() { x } else { -1e30 })
                .collect::<Vec<_>>()
        };
        assert_close(
            &format!("lse {name}"),
            &finite(gpu.dtoh(&ld).unwrap()),
            &finite(lse.clone()),
            &[s.q_rows()],
            1e-5,
        );

        let (mut dq, mut dk, mut dv) = (
            vec![0f32; s.q_len()],
            vec![0f32; s.kv_len()],
            vec![0f32; s.kv_len()],
        );
        llama_attn::backward(
            &q, &k, &v, &out, &lse, &dout, &s, &mask, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();
        let dod = gpu.htod(&dout).unwrap();
        let mut dqd = gpu.zeros::<f32>(s.q_len()).unwrap();
        let (mut dkd, mut dvd) = (
            gpu.zeros::<f32>(s.kv_len()).unwrap(),
            gpu.zeros::<f32>(s.kv_len()).unwrap(),
        );
        let o = AttnOutput::Heads(&od);
        cuda::backward(
            &gpu, &qd, &kd, &vd, o, &ld, &dod, &s, &mask, &mut dqd, &mut dkd, &mut dvd,
        )
        .unwrap();
        assert_close(
            &format!("dq {name}"),
            &gpu.dtoh(&dqd).unwrap(),
            &dq,
            &[s.q_len()],
            1e-4,
        );
        assert_close(
            &format!("dk {name}"),
            &gpu.dtoh(&dkd).unwrap(),
            &dk,
            &[s.kv_len()],
            1e-4,
        );
        assert_close(
            &format!("dv {name}"),
            &gpu.dtoh(&dvd).unwrap(),
            &dv,
            &[s.kv_len()],
            1e-4,
        );
    }
}

/// Causal self-attention without padding, the shape the training paths take.
fn self_attention(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
) -> AttnShape {
    AttnShape {
        batch,
        heads,
        kv_heads,
        seq_q: seq,
        seq_k: seq,
        kv_stride: seq,
        head_dim,
    }
}

/// Random inputs of causal self-attention and the CPU's forward and backward of them.
struct CpuBackward {
    /// q, k, v, O, dO
    inputs: [Vec<f32>; 5],
    lse: Vec<f32>,
    /// dQ, dK, dV
    grads: [Vec<f32>; 3],
}

fn cpu_backward(shape: &AttnShape, rng: &mut TestRng) -> CpuBackward {
    let mask = Mask {
        causal: true,
        padding: None,
    };
    let (q, k, v, dout) = (
        rng.vec(shape.q_len(), 2.0),
        rng.vec(shape.kv_len(), 2.0),
        rng.vec(shape.kv_len(), 1.0),
        rng.vec(shape.q_len(), 1.0),
    );
    let (mut out, mut lse) = (vec![0f32; shape.q_len()], vec![0f32; shape.q_rows()]);
    llama_attn::forward(&q, &k, &v, shape, &mask, &mut out, &mut lse).unwrap();
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; shape.q_len()],
        vec![0f32; shape.kv_len()],
        vec![0f32; shape.kv_len()],
    );
    llama_attn::backward(
        &q, &k, &v, &out, &lse, &dout, shape, &mask, &mut dq, &mut dk, &mut dv,
    )
    .unwrap();
    CpuBackward {
        inputs: [q, k, v, out, dout],
        lse,
        grads: [dq, dk, dv],
    }
}

/// `backward` (a device backward over uploaded q, k, v, dO in heads, O and L, writing dQ, dK,
/// dV) in bf16 against the CPU's gradients, within bf16's tolerance, with O in heads
/// [B, H, T, D] and merged [B, T, H, D].
fn check_bf16_backward(
    gpu: &CudaDevice,
    name: &str,
    shape: &AttnShape,
    cpu: &CpuBackward,
    backward: impl Fn(
        &[CudaSlice<bf16>; 4],
        AttnOutput<'_, bf16>,
        &CudaSlice<f32>,
        &mut [CudaSlice<bf16>; 3],
    ),
) {
    let b16 = |x: &[f32]| {
        gpu.htod(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
            .unwrap()
    };
    let [q, k, v, out, dout] = &cpu.inputs;
    let inputs = [q, k, v, dout].map(|x| b16(x));
    let (o_heads, o_merged) = (b16(out), b16(&merge_heads(out, shape)));
    for o in [AttnOutput::Heads(&o_heads), AttnOutput::Merged(&o_merged)] {
        let layout = if matches!(o, AttnOutput::Heads(_)) {
            "heads"
        } else {
            "merged"
        };
        let mut grads =
            [shape.q_len(), shape.kv_len(), shape.kv_len()].map(|n| gpu.zeros::<bf16>(n).unwrap());
        backward(&inputs, o, &gpu.htod(&cpu.lse).unwrap(), &mut grads);
        for ((what, got), want) in ["dq", "dk", "dv"].iter().zip(&grads).zip(&cpu.grads) {
            let got: Vec<f32> = gpu.dtoh(got).unwrap().iter().map(|v| v.to_f32()).collect();
            let name = format!("{name} bf16 {what} (O in {layout}) {shape:?}");
            assert_close(&name, &got, want, &[want.len()], 3e-2);
        }
    }
}

/// O [B, H, T, D] → [B, T, H, D].
fn merge_heads(out: &[f32], s: &AttnShape) -> Vec<f32> {
    let (t, d) = (s.seq_q, s.head_dim);
    let mut merged = vec![0f32; out.len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..t {
                let src = ((b * s.heads + h) * t + i) * d;
                let dst = ((b * t + i) * s.heads + h) * d;
                merged[dst..dst + d].copy_from_slice(&out[src..src + d]);
            }
        }
    }
    merged
}

/// The tensor-core GEMM backward of causal self-attention (the training path) against the
/// CPU: f32 and bf16, grouped heads, several query tiles, one pair per block and the default
/// block.
#[test]
fn gemm_backward_matches_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(5);
    let s = self_attention;
    // 600 positions: query tiles of 256, 256 and 88 rows.
    for shape in [
        s(2, 4, 2, 37, 16),
        s(1, 9, 3, 130, 64),
        s(2, 8, 8, 67, 128),
        s(1, 4, 2, 600, 64),
    ] {
        let cpu = cpu_backward(&shape, &mut rng);
        let [q, k, v, out, dout] = &cpu.inputs;
        let ld = gpu.htod(&cpu.lse).unwrap();
        for block in [1, cuda::GEMM_BACKWARD_SCORES] {
            let up = |x: &[f32]| gpu.htod(x).unwrap();
            let (mut dqd, mut dkd, mut dvd) = (
                gpu.zeros::<f32>(shape.q_len()).unwrap(),
                gpu.zeros::<f32>(shape.kv_len()).unwrap(),
                gpu.zeros::<f32>(shape.kv_len()).unwrap(),
            );
            cuda::backward_gemm(
                &gpu,
                &up(q),
                &up(k),
                &up(v),
                AttnOutput::Heads(&up(out)),
                &ld,
                &up(dout),
                &shape,
                &mut dqd,
                &mut dkd,
                &mut dvd,
                block,
            )
            .unwrap();
            for (what, got, want) in [
                ("dq", &dqd, &cpu.grads[0]),
                ("dk", &dkd, &cpu.grads[1]),
                ("dv", &dvd, &cpu.grads[2]),
            ] {
                let name = format!("gemm {what} {shape:?} block {block}");
                assert_close(&name, &gpu.dtoh(got).unwrap(), want, &[want.len()], 1e-4);
            }
            let name = format!("gemm block {block}");
            check_bf16_backward(
                &gpu,
                &name,
                &shape,
                &cpu,
                |[q, k, v, g], o, lse, [dq, dk, dv]| {
                    cuda::backward_gemm(&gpu, q, k, v, o, lse, g, &shape, dq, dk, dv, block)
                        .unwrap()
                },
            );
        }
    }
}

/// The FlashAttention-2 backward on the tensor cores (bf16, head_dim 64 and 128) against the
/// CPU: grouped heads, partial tiles of queries and keys (sequences that are not a multiple of
/// 64 or 128), one and several row blocks; other shapes are refused.
#[test]
fn tensor_core_backward_matches_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(6);
    let s = self_attention;
    for shape in [
        s(1, 4, 2, 600, 64),
        s(2, 8, 2, 150, 64),
        s(1, 3, 3, 17, 64),
        s(1, 4, 1, 67, 128),
        s(2, 2, 2, 300, 128),
    ] {
        assert!(cuda::tensor_core_backward::<bf16>(&shape));
        let cpu = cpu_backward(&shape, &mut rng);
        check_bf16_backward(
            &gpu,
            "tc",
            &shape,
            &cpu,
            |[q, k, v, g], o, lse, [dq, dk, dv]| {
                cuda::backward_tc(&gpu, q, k, v, o, lse, g, &shape, dq, dk, dv).unwrap()
            },
        );
    }
    for refused in [
        s(1, 2, 1, 40, 32),
        AttnShape {
            seq_q: 1,
            ..s(1, 2, 1, 40, 64)
        },
    ] {
        assert!(!cuda::tensor_core_backward::<bf16>(&refused));
    }
    assert!(!cuda::tensor_core_backward::<f32>(&s(1, 2, 1, 40, 64)));
}

#[test]
fn bf16_forward_matches_the_cpu_on_the_same_inputs() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(4);
    for (s, causal, padded) in cases() {
        let padding = vec![1usize; s.batch];
        let mask = Mask {
            causal,
            padding: padded.then_some(&padding[..]),
        };
        let round = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<bf16>>();
        let (q, k, v) = (
            round(rng.vec(s.q_len(), 2.0)),
            round(rng.vec(s.kv_len(), 2.0)),
            round(rng.vec(s.kv_len(), 1.0)),
        );
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
        llama_attn::forward(
            &widen(&q),
            &widen(&k),
            &widen(&v),
            &s,
            &mask,
            &mut out,
            &mut lse,
        )
        .unwrap();
        let mut od = gpu.zeros::<bf16>(s.q_len()).unwrap();
        let mut ld = gpu.zeros::<f32>(s.q_rows()).unwrap();
        cuda::forward(
            &gpu,
            &gpu.htod(&q).unwrap(),
            &gpu.htod(&k).unwrap(),
            &gpu.htod(&v).unwrap(),
            &s,
            &mask,
            &mut od,
            &mut ld,
        )
        .unwrap();
        assert_close(
            &format!("bf16 out {s:?}"),
            &widen(&gpu.dtoh(&od).unwrap()),
            &out,
            &[s.q_len()],
            1e-2,
        );
    }
}

#[test]
fn head_dims_past_the_kernels_limit_are_errors() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let s = AttnShape::self_attention(1, 1, 1, 2, 300);
    let buf = gpu.zeros::<f32>(s.q_len()).unwrap();
    let (mut out, mut lse) = (
        gpu.zeros::<f32>(s.q_len()).unwrap(),
        gpu.zeros::<f32>(s.q_rows()).unwrap(),
    );
    let err = cuda::forward(
        &gpu,
        &buf,
        &buf,
        &buf,
        &s,
        &Mask::causal(),
        &mut out,
        &mut lse,
    )
    .unwrap_err();
    assert!(err.to_string().contains("head_dim 300"), "{err}");
}

#[test]
fn the_device_cache_matches_the_host_cache_and_decodes_alike() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(5);
    let (batch, heads, kv_heads, d) = (2, 6, 2, 64);
    let mut host = KvCache::new(batch, kv_heads, d, 3, 5, 64).unwrap();
    let mut device = CudaKvCache::<f32>::new(&gpu, batch, kv_heads, d, 3, 5, 64).unwrap();
    for padded in [&mut *host as &mut llama_attn::CacheLayout, &mut *device] {
        padded.set_padding(vec![0, 2]).unwrap();
    }
    // A 4-token prefill, then single tokens: the caches grow at 5, 10, 15 positions.
    for tokens in [4usize, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1] {
        let n = batch * kv_heads * tokens * d;
        let (k, v) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
        host.append(&k, &v, tokens).unwrap();
        device
            .append(&gpu, &gpu.htod(&k).unwrap(), &gpu.htod(&v).unwrap(), tokens)
            .unwrap();
        assert_eq!(
            (device.len(), device.capacity(), device.grows()),
            (host.len(), host.capacity(), host.grows())
        );
        let slabs = batch * kv_heads;
        let filled = |all: &[f32]| -> Vec<f32> {
            (0..slabs)
                .flat_map(|s| all[s * host.capacity() * d..][..host.len() * d].to_vec())
                .collect()
        };
        assert_eq!(
            filled(&gpu.dtoh(device.keys()).unwrap()),
            filled(host.keys()),
            "keys after {} positions",
            host.len()
        );
        assert_eq!(
            filled(&gpu.dtoh(device.values()).unwrap()),
            filled(host.values()),
            "values"
        );
        // One decode query per head against each cache.
        let s = host.shape(heads, 1);
        let q = rng.vec(s.q_len(), 1.0);
        let (mut out, mut lse) = (vec![0f32; s.q_len()], vec![0f32; s.q_rows()]);
        llama_attn::forward(
            &q,
            host.keys(),
            host.values(),
            &s,
            &host.mask(),
            &mut out,
            &mut lse,
        )
        .unwrap();
        let (mut od, mut ld) = (
            gpu.zeros::<f32>(s.q_len()).unwrap(),
            gpu.zeros::<f32>(s.q_rows()).unwrap(),
        );
        cuda::forward(
            &gpu,
            &gpu.htod(&q).unwrap(),
            device.keys(),
            device.values(),
            &device.shape(heads, 1),
            &device.mask(),
            &mut od,
            &mut ld,
        )
        .unwrap();
        assert_close(
            &format!("decode at {} positions", host.len()),
            &gpu.dtoh(&od).unwrap(),
            &out,
            &[s.q_len()],
            1e-5,
        );
    }
    assert_eq!(host.grows(), 3);
    assert_eq!(device.memory_bytes(), host.memory_bytes());
}

#[test]
fn the_layer_on_the_gpu_prefills_and_decodes_like_the_cpu() {
    let Some(gpu) = cuda_or_skip!() else { return };
    let mut rng = TestRng::new(6);
    let (hidden, heads, kv_heads, d) = (128, 4, 2, 32);
    let mut cpu = common::random_layer(&mut rng, hidden, heads, kv_heads, 1024);
    let mut gpu_f32 = CudaLlamaAttention::<f32>::upload(&gpu, &cpu).unwrap();
    let mut gpu_bf16 = CudaLlamaAttention::<bf16>::upload(&gpu, &cpu).unwrap();
    let (batch, prompt) = (2, 9);
    let padding = vec![0usize, 3];
    let mut host = cpu.new_cache(batch, 4, 4, 64).unwrap();
    let mut dev32 = CudaKvCache::<f32>::new(&gpu, batch, kv_heads, d, 4, 4, 64).unwrap();
    let mut dev16 = CudaKvCache::<bf16>::new(&gpu, batch, kv_heads, d, 4, 4, 64).unwrap();
    host.set_padding(padding.clone()).unwrap();
    dev32.set_padding(padding.clone()).unwrap();
    dev16.set_padding(padding.clone()).unwrap();
    for (step, tokens) in [prompt, 1, 1, 1, 1].into_iter().enumerate() {
        let x = rng.vec(batch * tokens * hidden, 1.0);
        let start = if step == 0 { 0 } else { prompt + step - 1 };
        let ids: Vec<u32> = (0..batch)
            .flat_map(|b| {
                (start..start + tokens)
                    .map(move |t| t.saturating_sub(if b == 1 { 3 } else { 0 }) as u32)
            })
            .collect();
        let expected = cpu.forward_cached(&x, batch, &ids, &mut host).unwrap();
        let got = gpu_f32
            .forward_cached(&gpu.htod(&x).unwrap(), batch, &ids, &mut dev32)
            .unwrap();
        let dims = [batch, tokens, hidden];
        // Left-padding rows attend to nothing: compare the real tokens only.
        let pads = &padding;
        let real = |v: &[f32]| -> Vec<f32> {
            let mut kept = Vec::new();
            for (b, &pad) in pads.iter().enumerate() {
                for t in (0..tokens).filter(|&t| start + t >= pad) {
                    kept.extend_from_slice(&v[(b * tokens + t) * hidden..][..hidden]);
                }
            }
            kept
        };
        assert_close(
            &format!("f32 step {step}"),
            &real(&gpu.dtoh(&got).unwrap()),
            &real(&expected),
            &dims,
            1e-5,
        );
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let got16 = gpu_bf16
            .forward_cached(&gpu.htod(&xb).unwrap(), batch, &ids, &mut dev16)
            .unwrap();
        let got16: Vec<f32> = gpu
            .dtoh(&got16)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        assert_close(
            &format!("bf16 step {step}"),
            &real(&got16),
            &real(&expected),
            &dims,
            3e-2,
        );
    }
}

/// attend → backward, against attend_saved (the first forward's buffers taken back, as
/// gradient checkpointing brings them back from the host) → backward: the same gradients, bit
/// for bit; buffers of the wrong lengths are an error.
fn kept_attention_gives_the_same_gradients<T>(gpu: &std::sync::Arc<CudaDevice>, head_dim: usize)
where
    T: llama_ops::cuda::CudaElement + llama_rope::cuda::RopeElement + PartialEq + std::fmt::Debug,
{
    let mut rng = TestRng::new(7);
    let (heads, kv_heads, batch, seq) = (4, 2, 2, 150);
    let cpu = common::random_layer(&mut rng, heads * head_dim, heads, kv_heads, 512);
    let mut layer = CudaLlamaAttention::<T>::upload(gpu, &cpu).unwrap();
    let upload = |len: usize, rng: &mut TestRng| -> CudaSlice<T> {
        let values: Vec<T> = rng.vec(len, 1.0).into_iter().map(T::from_f32).collect();
        gpu.htod(&values).unwrap()
    };
    let rows = batch * seq;
    let q = upload(rows * heads * head_dim, &mut rng);
    let k = upload(rows * kv_heads * head_dim, &mut rng);
    let v = upload(rows * kv_heads * head_dim, &mut rng);
    let d_merged = upload(rows * heads * head_dim, &mut rng);
    let positions: Vec<u32> = (0..seq as u32).collect();
    let (merged, saved) = layer.attend([&q, &k, &v], batch, &positions).unwrap();
    let expected = layer.attend_backward(&saved, &merged, &d_merged).unwrap();
    let buffers = saved.into_buffers();
    let copy = |x: &CudaSlice<T>, drop_last: usize| {
        let host = gpu.dtoh(x).unwrap();
        gpu.htod(&host[..host.len() - drop_last]).unwrap()
    };
    let copies = |short: [usize; 4]| llama_attn::AttendBuffers {
        q: copy(&buffers.q, short[0]),
        k: copy(&buffers.k, short[1]),
        v: copy(&buffers.v, short[2]),
        lse: gpu
            .htod(&gpu.dtoh(&buffers.lse).unwrap()[short[3]..])
            .unwrap(),
    };
    for short in [
        [0, 0, 0, 1],
        [0, 1, 0, 0],
        [0, 0, head_dim, 0],
        [head_dim, 0, 0, 0],
    ] {
        let err = layer.attend_saved(copies(short), batch, &positions);
        assert!(err.is_err(), "buffers short by {short:?} were taken");
    }
    let kept = layer
        .attend_saved(copies([0; 4]), batch, &positions)
        .unwrap();
    let got = layer.attend_backward(&kept, &merged, &d_merged).unwrap();
    for (j, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
        let got = gpu.dtoh(&got[j]).unwrap();
        assert!(
            got == gpu.dtoh(&expected[j]).unwrap(),
            "{} {name} differs",
            T::SUFFIX
        );
    }
}

#[test]
fn attention_backward_from_its_kept_buffers_gives_the_same_gradients() {
    let Some(gpu) = cuda_or_skip!() else { return };
    // bf16 at head_dim 64 and 128: the tensor-core backward; f32: the GEMM backward.
    kept_attention_gives_the_same_gradients::<bf16>(&gpu, 64);
    kept_attention_gives_the_same_gradients::<bf16>(&gpu, 128);
    kept_attention_gives_the_same_gradients::<f32>(&gpu, 32);
}
