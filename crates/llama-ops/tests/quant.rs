//! Quantised weights: decoding against known answers (gguf-py's dequantiser on random blocks,
//! `tests/data/ggml_vectors.json`, and hand-built blocks), ggml's quantisers reproduced byte for
//! byte, quantise → dequantise error bounds per format, and the fused matrix-vector and matrix
//! products against dequantise-then-multiply in f64.

use llama_core::DType;
use llama_fixtures::{assert_close, to_f64, TestRng};
use llama_ops::quant::{nf4, Nf4DoubleQuant, NF4_TABLE};
use llama_ops::{quantize, reference, supports_q8, Q8Vector, QuantMatrix};
use proptest::prelude::*;
use serde_json::Value;

/// Every block-quantised dtype.
fn quantised() -> Vec<DType> {
    DType::ALL.into_iter().filter(|d| !d.is_float()).collect()
}

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ggml_vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn dtype_named(name: &str) -> DType {
    quantised()
        .into_iter()
        .find(|d| d.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn decoding_equals_gguf_py_bit_for_bit() {
    let v = vectors();
    let cases = v["dequantize"].as_array().unwrap();
    assert_eq!(cases.len(), 6, "one case per GGUF format");
    for case in cases {
        let dtype = dtype_named(case["type"].as_str().unwrap());
        let bytes = hex(case["bytes"].as_str().unwrap());
        let expected: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let w = QuantMatrix::new(dtype, 1, expected.len(), &bytes).unwrap();
        let got = w.dequantize();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g.to_bits(), e.to_bits(), "{dtype} value {i}: {g} vs {e}");
        }
        assert_eq!(reference::dequantize(&w), got, "{dtype} reference");
    }
}

#[test]
fn quantisers_equal_ggml_byte_for_byte() {
    let v = vectors();
    for case in v["quantize"].as_array().unwrap() {
        let dtype = dtype_named(case["type"].as_str().unwrap());
        let input: Vec<f32> = case["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let cols = case["cols"].as_u64().unwrap() as usize;
        let got = quantize(dtype, &input, cols).unwrap();
        assert_eq!(got, hex(case["bytes"].as_str().unwrap()), "{dtype}");
    }
}

#[test]
fn hand_built_blocks_decode_to_known_values() {
    // Q4_0: d = 0.5, qs[j] = j | (15 − j) << 4 → w[j] = (j − 8)/2, w[j + 16] = (7 − j)/2.
    let mut q4 = vec![0x00, 0x38]; // f16 0.5
    q4.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let w = QuantMatrix::new(DType::Q4_0, 1, 32, &q4)
        .unwrap()
        .dequantize();
    for j in 0..16 {
        assert_eq!(w[j], (j as f32 - 8.0) / 2.0);
        assert_eq!(w[j + 16], (7.0 - j as f32) / 2.0);
    }
    // Q8_0: d = 0.125, q = j − 16.
    let mut q8 = vec![0x00, 0x30]; // f16 0.125
    q8.extend((0..32i8).map(|j| (j - 16) as u8));
    let w = QuantMatrix::new(DType::Q8_0, 1, 32, &q8)
        .unwrap()
        .dequantize();
    assert!((0..32).all(|j| w[j] == (j as f32 - 16.0) * 0.125));
    // NF4: codes 0..15 twice, absmax 2 → 2 · table, first code in the high nibble.
    let mut n4: Vec<u8> = (0..32u8)
        .map(|j| (((2 * j) % 16) << 4) | ((2 * j + 1) % 16))
        .collect();
    n4.extend(2f32.to_le_bytes());
    let w = QuantMatrix::new(DType::Nf4, 1, 64, &n4)
        .unwrap()
        .dequantize();
    assert!((0..64).all(|j| w[j] == 2.0 * NF4_TABLE[j % 16]));
    // Q4_K: sub-block scales and mins that use all six bits, d = 1, dmin = 0.5.
    let (sc, mn): (Vec<u8>, Vec<u8>) = (0..8).map(|j| (63 - 7 * j, 20 + 5 * j)).unzip();
    let mut q4k = vec![0x00, 0x3c, 0x00, 0x38];
    q4k.extend(pack_scales(&sc, &mn));
    q4k.extend((0..128).map(|l| (l * 7 % 256) as u8));
    let w = QuantMatrix::new(DType::Q4K, 1, 256, &q4k)
        .unwrap()
        .dequantize();
    for (i, &v) in w.iter().enumerate() {
        let (sub, l) = (i / 32, i % 32);
        let byte = ((sub / 2 * 32 + l) * 7 % 256) as u8;
        let q = if sub % 2 == 0 { byte & 15 } else { byte >> 4 };
        let expected = sc[sub] as f32 * q as f32 - 0.5 * mn[sub] as f32;
        assert_eq!(v, expected, "Q4_K weight {i}");
    }
}

/// ggml's 12-byte packing of eight 6-bit (scale, min) pairs, the inverse of get_scale_min_k4.
fn pack_scales(sc: &[u8], mn: &[u8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        q[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
        q[j + 8] = (sc[j + 4] & 15) | (mn[j + 4] & 15) << 4;
    }
    q
}

/// Random, valid blocks: random bytes with the scale fields set to small f16/f32 values.
fn random_blocks(dtype: DType, n_blocks: usize, rng: &mut TestRng) -> Vec<u8> {
    let size = dtype.block_bytes();
    let mut bytes: Vec<u8> = (0..n_blocks * size).map(|_| rng.next_u64() as u8).collect();
    let f16_fields: &[usize] = match dtype {
        DType::Q4_0 | DType::Q8_0 => &[0],
        DType::Q4_1 | DType::Q4K | DType::Q5K => &[0, 2],
        DType::Q6K => &[208],
        _ => &[],
    };
    for block in bytes.chunks_exact_mut(size) {
        for &at in f16_fields {
            let v = half::f16::from_f32(rng.uniform() * 0.05);
            block[at..at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
        if dtype == DType::Nf4 {
            block[32..36].copy_from_slice(&(rng.uniform().abs() * 0.1).to_le_bytes());
        }
    }
    bytes
}

#[test]
fn fused_products_equal_dequantise_then_multiply() {
    let mut rng = TestRng::new(7);
    for dtype in quantised() {
        for (rows, blocks_per_row, m) in [(1, 1, 1), (37, 3, 1), (130, 2, 5), (9, 5, 3)] {
            let cols = blocks_per_row * dtype.block_len();
            let bytes = random_blocks(dtype, rows * blocks_per_row, &mut rng);
            let w = QuantMatrix::new(dtype, rows, cols, &bytes).unwrap();
            let dense = to_f64(&reference::dequantize(&w));
            let x = rng.vec(m * cols, 1.0);
            let expected: Vec<f32> = reference::linear(&to_f64(&x), &dense, cols)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let mut y = vec![0f32; m * rows];
            w.matmul(&x, &mut y).unwrap();
            let name = format!("{dtype} [{rows}, {cols}] × {m}");
            assert_close(&name, &y, &expected, &[m, rows], 1e-5);
            if m == 1 {
                let mut yv = vec![0f32; rows];
                w.matvec(&x, &mut yv).unwrap();
                assert_close(&name, &yv, &expected, &[rows], 1e-5);
            }
        }
    }
}

/// Largest error allowed for one block of `w` after quantise → dequantise.
fn block_bound(dtype: DType, w: &[f32]) -> f32 {
    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (min, max) = w
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    // f16 scales add up to 2⁻¹¹ relative error on each reconstructed value.
    let f16_slack = 2.0 * amax / 2048.0;
    match dtype {
        DType::Q8_0 => amax / 254.0 + f16_slack,
        // The value opposite in sign to the largest one may sit a whole step from its code.
        DType::Q4_0 => amax / 8.0 + f16_slack,
        DType::Q4_1 => (max - min) / 30.0 + f16_slack,
        // Half the widest gap of the NF4 table (between −1 and −0.696).
        DType::Nf4 => amax * (NF4_TABLE[1] - NF4_TABLE[0]) / 2.0 * 1.0001,
        _ => unreachable!(),
    }
}

#[test]
fn quantise_dequantise_error_bounds() {
    let mut rng = TestRng::new(11);
    for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Nf4] {
        let (rows, cols) = (7, 4 * dtype.block_len());
        // Roughly Gaussian weights (sum of uniforms), with one outlier row.
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|_| (0..4).map(|_| rng.uniform()).sum::<f32>() * 0.02)
            .collect();
        w[3 * cols + 5] = 0.9;
        let bytes = quantize(dtype, &w, cols).unwrap();
        let back = QuantMatrix::new(dtype, rows, cols, &bytes)
            .unwrap()
            .dequantize();
        for (b, (orig, got)) in w
            .chunks(dtype.block_len())
            .zip(back.chunks(dtype.block_len()))
            .enumerate()
        {
            let bound = block_bound(dtype, orig);
            let worst = orig
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= bound,
                "{dtype} block {b}: error {worst} > bound {bound}"
            );
        }
        let rel_rms = llama_fixtures::rel_error(&back, &w);
        let limit = if dtype == DType::Q8_0 { 0.02 } else { 0.2 };
        assert!(rel_rms < limit, "{dtype}: relative RMS error {rel_rms}");
    }
}

#[test]
fn double_quantisation_keeps_absmax_close_and_saves_memory() {
    let map = nf4::dynamic_map();
    assert!(map.windows(2).all(|p| p[0] < p[1]), "sorted, distinct");
    assert!(
        map[0] == -0.992_968_75 && map[255] == 1.0,
        "ends {} {}",
        map[0],
        map[255]
    );
    assert!(map.contains(&0.0));

    let mut rng = TestRng::new(3);
    let (rows, cols) = (300, 128); // 600 blocks: three groups of 256, the last one partial
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.uniform() * (1.0 + rng.uniform()))
        .collect();
    let blocks = quantize(DType::Nf4, &w, cols).unwrap();
    let dq = Nf4DoubleQuant::compress(&QuantMatrix::new(DType::Nf4, rows, cols, &blocks).unwrap())
        .unwrap();
    let q4 = QuantMatrix::new(DType::Q4_0, 1, 32, &[0; 18]).unwrap();
    assert!(
        Nf4DoubleQuant::compress(&q4).is_err(),
        "only NF4 compresses"
    );
    assert_eq!(dq.absmax_scales.len(), 3);
    // 33 bytes per block instead of 36, plus one f32 scale per group and the offset.
    assert_eq!(dq.bytes(), 600 * 33 + 3 * 4 + 4);
    let expanded = dq.expand();
    for (i, (a, b)) in blocks.chunks(36).zip(expanded.chunks(36)).enumerate() {
        assert_eq!(a[..32], b[..32], "codes of block {i}");
        let (orig, back) = (f32_at(a), f32_at(b));
        let scale = dq.absmax_scales[i / nf4::DOUBLE_QUANT_BLOCK];
        assert!(
            (orig - back).abs() <= 0.008 * scale,
            "block {i}: {orig} → {back} (scale {scale})"
        );
    }
}

fn f32_at(block: &[u8]) -> f32 {
    f32::from_le_bytes(block[32..36].try_into().unwrap())
}

#[test]
fn malformed_quantised_inputs_are_errors() {
    let bytes = vec![0u8; 18 * 4];
    assert!(QuantMatrix::new(DType::Q4_0, 2, 64, &bytes).is_ok());
    assert!(QuantMatrix::new(DType::Q4_0, 2, 64, &bytes[..70]).is_err());
    let msg = QuantMatrix::new(DType::Q4_0, 4, 16, &bytes)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("whole blocks of 32"), "{msg}");
    assert!(QuantMatrix::new(DType::F32, 1, 1, &bytes).is_err());
    assert!(quantize(DType::Q4K, &[0.0; 256], 256).is_err());
    assert!(quantize(DType::Q8_0, &[0.0; 48], 48).is_err());
    let w = QuantMatrix::new(DType::Q4_0, 2, 64, &bytes).unwrap();
    assert!(w.matvec(&[0.0; 63], &mut [0.0; 2]).is_err());
    assert!(w.matmul(&[0.0; 128], &mut [0.0; 3]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The fused products (SIMD on this CPU where it has them) against dequantise-then-multiply
    /// in f64, for every format at random awkward sizes.
    #[test]
    fn fused_products_at_random_sizes(
        format in 0usize..7, rows in 1usize..70, blocks in 1usize..6, m in 1usize..4, seed: u64,
    ) {
        let dtype = quantised()[format];
        let mut rng = TestRng::new(seed);
        let cols = blocks * dtype.block_len();
        let bytes = random_blocks(dtype, rows * blocks, &mut rng);
        let w = QuantMatrix::new(dtype, rows, cols, &bytes).unwrap();
        let dense = to_f64(&reference::dequantize(&w));
        let x = rng.vec(m * cols, 1.0);
        let expected: Vec<f32> =
            reference::linear(&to_f64(&x), &dense, cols).iter().map(|&v| v as f32).collect();
        let mut y = vec![0f32; m * rows];
        w.matmul(&x, &mut y).unwrap();
        let err = llama_fixtures::rel_error(&y, &expected);
        prop_assert!(err < 1e-5, "{dtype} [{rows}, {cols}] × {m}: relative error {err:e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The integer products of the `fast` path (AVX2 on this CPU) equal W · x̂ with x̂ the
    /// dequantised 8-bit activations, and x̂ stays within half a step of x.
    #[test]
    fn q8_activation_products_at_random_sizes(
        format in 0usize..3, rows in 1usize..70, blocks in 1usize..9, scale in 0.01f32..100.0, seed: u64,
    ) {
        let dtype = [DType::Q4_0, DType::Q4_1, DType::Q8_0][format];
        prop_assert!(supports_q8(dtype));
        let mut rng = TestRng::new(seed);
        let cols = blocks * 32;
        let bytes = random_blocks(dtype, rows * blocks, &mut rng);
        let w = QuantMatrix::new(dtype, rows, cols, &bytes).unwrap();
        let x = rng.vec(cols, scale);
        let xq = Q8Vector::quantize(&x).unwrap();
        let x_hat = xq.dequantize();
        for (block, (xs, hs)) in x.chunks(32).zip(x_hat.chunks(32)).enumerate() {
            let step = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in xs.iter().zip(hs) {
                prop_assert!((a - b).abs() <= step * 0.5001 + 1e-30, "block {block}: {a} → {b}");
            }
        }
        let (dense, x_hat) = (to_f64(&reference::dequantize(&w)), to_f64(&x_hat));
        let expected = reference::linear(&x_hat, &dense, cols);
        let mut y = vec![0f32; rows];
        w.matvec_q8(&xq, &mut y).unwrap();
        // f32 sums of per-block products round relative to the terms' sizes, not to the result
        // (a row whose terms cancel has a tiny one), so each row is held to Σ|w|·|x̂|: a wrong
        // or missing block is off by about a block's share of it.
        let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
        let magnitude = reference::linear(&abs(&x_hat), &abs(&dense), cols);
        for (row, ((&got, &want), &size)) in y.iter().zip(&expected).zip(&magnitude).enumerate() {
            let err = (f64::from(got) - want).abs();
            prop_assert!(
                err <= 2e-6 * size,
                "{dtype} [{rows}, {cols}] row {row}: {got} against {want} (Σ|w|·|x̂| {size:e})"
            );
        }
    }
}

#[test]
fn q8_products_reject_other_formats_and_sizes() {
    let bytes = vec![0u8; DType::Q6K.block_bytes()];
    let w = QuantMatrix::new(DType::Q6K, 1, 256, &bytes).unwrap();
    let x = Q8Vector::quantize(&[0.5; 256]).unwrap();
    assert!(w.matvec_q8(&x, &mut [0.0]).is_err());
    assert!(Q8Vector::quantize(&[0.5; 33]).is_err());
    let bytes = vec![0u8; DType::Q8_0.block_bytes()];
    let w = QuantMatrix::new(DType::Q8_0, 1, 32, &bytes).unwrap();
    assert!(w.matvec_q8(&x, &mut [0.0]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// bf16 weights: `convert` rounds each value to the nearest bf16, and every product (one
    /// row: the widening SIMD dot; several: widen then GEMM), the input gradient and the row
    /// lookup equal f64 arithmetic on the rounded values; past 256 rows the products run over
    /// several tiles.
    #[test]
    fn bf16_weights_at_random_sizes(rows in 1usize..600, cols in 1usize..300, m in 1usize..4, seed: u64) {
        let mut w = Bf16Case::new(rows, cols, m, seed, |w| w.convert(DType::BF16));
        prop_assert_eq!(w.weight.memory_bytes(), 2 * rows * cols);
        w.check(false)?;
    }

    /// bf16 panels (`fast` precision's CPU training weights): the stored values are the
    /// nearest bf16s, and the forward and the input gradient equal f64 arithmetic on those and
    /// on the activations rounded to bf16 (their products round them), at awkward sizes: one
    /// row, partial panels, odd inner sizes.
    #[test]
    fn bf16_panels_at_random_sizes(rows in 1usize..300, cols in 1usize..200, m in 1usize..30, seed: u64) {
        let mut w = Bf16Case::new(rows, cols, m, seed, |w| w.pack_bf16());
        prop_assert!(w.weight.memory_bytes() >= 4 * rows * cols);
        w.check(true)?;
        let wrong = w.weight.forward(&vec![0.5; m * cols + 1], &mut vec![0.0; m * rows]);
        prop_assert!(wrong.is_err(), "a ragged x is an error");
    }
}

/// A random [rows, cols] weight stored as bf16 by `store`, with m activation rows.
struct Bf16Case {
    weight: llama_ops::Weight,
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    m: usize,
    rng: TestRng,
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&v| llama_core::bf16::from_f32(v).to_f32())
        .collect()
}

impl Bf16Case {
    fn new(
        rows: usize,
        cols: usize,
        m: usize,
        seed: u64,
        store: impl Fn(llama_ops::Weight) -> llama_ops::Result<llama_ops::Weight>,
    ) -> Bf16Case {
        let mut rng = TestRng::new(seed);
        let values = rng.vec(rows * cols, 1.0);
        let weight = store(llama_ops::Weight::dense(values.clone(), rows, cols).unwrap()).unwrap();
        Bf16Case {
            weight,
            values,
            rows,
            cols,
            m,
            rng,
        }
    }

    /// Values, shape, products of one and of m rows, the input gradient and the last row's
    /// lookup against f64 arithmetic on the rounded weights — and on rounded activations when
    /// `rounds_activations`.
    fn check(&mut self, rounds_activations: bool) -> Result<(), TestCaseError> {
        let (w, rows, cols, m) = (&self.weight, self.rows, self.cols, self.m);
        let activations = |v: Vec<f32>| {
            if rounds_activations {
                round_bf16(&v)
            } else {
                v
            }
        };
        prop_assert_eq!((w.dtype(), w.shape()), (DType::BF16, (rows, cols)));
        let rounded = round_bf16(&self.values);
        prop_assert_eq!(&w.to_f32().unwrap()[..], &rounded[..]);
        let dense = to_f64(&rounded);
        for m in [1, m] {
            let x = self.rng.vec(m * cols, 1.0);
            let expected: Vec<f32> =
                reference::linear(&to_f64(&activations(x.clone())), &dense, cols)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
            let mut y = vec![0f32; m * rows];
            w.forward(&x, &mut y).unwrap();
            let err = llama_fixtures::rel_error(&y, &expected);
            prop_assert!(err < 1e-5, "[{rows}, {cols}] × {m}: relative error {err:e}");
        }
        let dy = self.rng.vec(m * rows, 1.0);
        let mut dx = vec![0f32; m * cols];
        w.backward_input(&dy, &mut dx).unwrap();
        let mut expected = vec![0f32; m * cols];
        let rounded_dense = llama_ops::Weight::dense(rounded.clone(), rows, cols).unwrap();
        rounded_dense
            .backward_input(&activations(dy), &mut expected)
            .unwrap();
        // Widened weights times f32 dy: f32 sums of exact products; bf16 products: the same
        // terms in another order (pairs first).
        let bound = if rounds_activations { 1e-5 } else { 1e-6 };
        prop_assert!(llama_fixtures::rel_error(&dx, &expected) < bound);
        let mut row = vec![0f32; cols];
        w.row(rows - 1, &mut row).unwrap();
        prop_assert_eq!(&row[..], &rounded[(rows - 1) * cols..]);
        Ok(())
    }
}
