//! Quantisation of f32 weights, one block at a time, as ggml's reference quantisers
//! (`quantize_row_q4_0_ref`, `…_q4_1_ref`, `…_q8_0_ref`) and bitsandbytes' NF4 do it.

use half::f16;

/// Writes an f16 (round to nearest-even, as ggml's FP32_TO_FP16) at `at`.
fn put_f16(out: &mut [u8], at: usize, v: f32) {
    out[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// Q4_0: d = the signed value of largest magnitude / −8, q = min(15, trunc(w/d + 8.5)).
pub(crate) fn q4_0(w: &[f32], out: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in w {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    let quant = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..16 {
        out[2 + j] = quant(w[j]) | (quant(w[j + 16]) << 4);
    }
}

/// Q4_1: d = (max − min) / 15, m = min, q = min(15, trunc((w − min)/d + 0.5)).
pub(crate) fn q4_1(w: &[f32], out: &mut [u8]) {
    let min = w.iter().copied().fold(f32::INFINITY, f32::min);
    let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    put_f16(out, 2, min);
    let quant = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    for j in 0..16 {
        out[4 + j] = quant(w[j]) | (quant(w[j + 16]) << 4);
    }
}

/// Q8_0: d = max |w| / 127, q = round(w / d) (half away from zero).
pub(crate) fn q8_0(w: &[f32], out: &mut [u8]) {
    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, 0, d);
    for (o, &v) in out[2..34].iter_mut().zip(w) {
        *o = (v * id).round() as i8 as u8;
    }
}
