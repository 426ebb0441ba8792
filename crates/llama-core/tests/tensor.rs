//! Tensor construction, conversion and errors on the CPU (suite `core`).

use llama_core::{bf16, f16, DType, Device, Error, Tensor};
use proptest::prelude::*;

#[test]
fn from_vec_round_trips_and_checks_length() {
    let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]).unwrap();
    assert_eq!(t.dims(), &[2, 3]);
    assert_eq!(t.dtype(), DType::F32);
    assert_eq!(t.device(), Device::Cpu);
    assert_eq!(
        t.to_vec::<f32>().unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );

    let err = Tensor::from_vec(vec![1.0f32; 5], [2, 3]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ElementCount {
                expected: 6,
                got: 5,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn overflowing_shape_is_an_error() {
    let err = Tensor::from_raw_bytes(&[], DType::F32, [usize::MAX, 2]).unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
}

#[test]
fn wrong_element_type_is_an_error() {
    let t = Tensor::from_vec(vec![bf16::ONE; 4], 4).unwrap();
    let err = t.to_vec::<f32>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::DTypeMismatch {
                requested: DType::F32,
                actual: DType::BF16
            }
        ),
        "{err}"
    );
}

#[test]
fn raw_bytes_of_block_kinds_need_whole_blocks() {
    let block = DType::Q4_0.block_bytes();
    let t = Tensor::from_raw_bytes(&vec![0u8; 2 * block], DType::Q4_0, [2, 32]).unwrap();
    assert_eq!(t.storage_bytes(), 2 * block);
    let err = Tensor::from_raw_bytes(&vec![0u8; block], DType::Q4_0, [1, 31]).unwrap_err();
    assert!(err.to_string().contains("whole blocks"), "{err}");
    let err = Tensor::from_raw_bytes(&vec![0u8; block - 1], DType::Q4_0, [1, 32]).unwrap_err();
    assert!(err.to_string().contains("needs 18 bytes, got 17"), "{err}");
}

#[test]
fn reshape_keeps_data_and_checks_count() {
    let t = Tensor::from_vec((0..12).map(|i| i as f32).collect(), [3, 4]).unwrap();
    let t = t.reshape([2, 6]).unwrap();
    assert_eq!(t.dims(), &[2, 6]);
    assert_eq!(t.to_vec::<f32>().unwrap()[11], 11.0);
    assert!(t.reshape([5]).is_err());
}

#[test]
fn add_rejects_mismatched_operands() {
    let a = Tensor::from_vec(vec![1.0f32; 6], [2, 3]).unwrap();
    let b = Tensor::from_vec(vec![1.0f32; 6], [3, 2]).unwrap();
    assert!(matches!(a.add(&b), Err(Error::ShapeMismatch { .. })));
    let c = a.to_dtype(DType::BF16).unwrap();
    assert!(matches!(a.add(&c), Err(Error::DTypeMismatch { .. })));
    let q = Tensor::from_raw_bytes(&[0u8; 18], DType::Q4_0, 32).unwrap();
    assert!(matches!(
        q.add(&q),
        Err(Error::UnsupportedDType { op: "add", .. })
    ));
    assert!(matches!(
        q.to_dtype(DType::F32),
        Err(Error::UnsupportedDType { .. })
    ));
}

#[test]
fn safetensors_round_trip_through_a_file() {
    let dir = std::env::temp_dir().join(format!("llama-core-st-{}", std::process::id()));
    let path = dir.join("t.safetensors");
    let a = Tensor::from_vec(vec![0.5f32, -1.25, 3.0], 3).unwrap();
    let b = Tensor::from_vec(vec![f16::from_f32(2.5); 4], [2, 2]).unwrap();
    Tensor::save_safetensors(&[("a", &a), ("b", &b)], &path).unwrap();

    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a2 = Tensor::from_safetensors(&st.tensor("a").unwrap()).unwrap();
    let b2 = Tensor::from_safetensors(&st.tensor("b").unwrap()).unwrap();
    assert_eq!(a2.to_vec::<f32>().unwrap(), a.to_vec::<f32>().unwrap());
    assert_eq!(b2.dims(), &[2, 2]);
    assert_eq!(b2.to_vec_f32().unwrap(), vec![2.5; 4]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn safetensors_integer_tensors_are_refused_with_the_dtype() {
    let data = [0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![2], &data).unwrap();
    let err = Tensor::from_safetensors(&view).unwrap_err();
    assert!(err.to_string().contains("I64"), "{err}");
}

/// The two values of type T nearest to x on either side bound the rounding error: a correctly
/// rounded result is at least as close to x as any other representable value.
fn is_nearest<T: llama_core::Element>(
    x: f32,
    r: T,
    next_up: impl Fn(T) -> T,
    next_down: impl Fn(T) -> T,
) -> bool {
    let err = |v: T| (f64::from(v.to_f32()) - f64::from(x)).abs();
    let e = err(r);
    e <= err(next_up(r)) && e <= err(next_down(r))
}

/// The bit pattern of the neighbour of a 16-bit float one step up (or down) in value.
fn neighbour(bits: u16, up: bool) -> u16 {
    let negative = bits & 0x8000 != 0;
    if up != negative {
        bits + 1
    } else {
        bits.wrapping_sub(1)
    }
}

fn bf16_step(v: bf16, up: bool) -> bf16 {
    bf16::from_bits(neighbour(v.to_bits(), up))
}

fn f16_step(v: f16, up: bool) -> f16 {
    f16::from_bits(neighbour(v.to_bits(), up))
}

proptest! {
    #[test]
    fn cast_to_bf16_rounds_to_nearest(x in -1e30f32..1e30f32) {
        let t = Tensor::from_vec(vec![x], 1).unwrap().to_dtype(DType::BF16).unwrap();
        let r = t.to_vec::<bf16>().unwrap()[0];
        prop_assume!(r.to_bits() & 0x7fff != 0 && r.is_finite());
        prop_assert!(is_nearest(x, r, |v| bf16_step(v, true), |v| bf16_step(v, false)));
    }

    #[test]
    fn cast_to_f16_rounds_to_nearest(x in -60000f32..60000f32) {
        let t = Tensor::from_vec(vec![x], 1).unwrap().to_dtype(DType::F16).unwrap();
        let r = t.to_vec::<f16>().unwrap()[0];
        prop_assume!(r.to_bits() & 0x7fff != 0 && r.is_finite());
        prop_assert!(is_nearest(x, r, |v| f16_step(v, true), |v| f16_step(v, false)));
    }

    #[test]
    fn widening_then_narrowing_is_identity(bits in any::<u16>()) {
        let v = bf16::from_bits(bits);
        prop_assume!(!v.is_nan());
        let t = Tensor::from_vec(vec![v], 1).unwrap();
        let back = t.to_dtype(DType::F32).unwrap().to_dtype(DType::BF16).unwrap();
        prop_assert_eq!(back.to_vec::<bf16>().unwrap()[0].to_bits(), bits);
    }

    #[test]
    fn add_is_the_f32_sum_rounded(a in proptest::collection::vec(-1e4f32..1e4, 1..300)) {
        let b: Vec<f32> = a.iter().rev().copied().collect();
        let ta = Tensor::from_slice(&a, a.len()).unwrap();
        let tb = Tensor::from_slice(&b, b.len()).unwrap();
        let sum = ta.add(&tb).unwrap().to_vec::<f32>().unwrap();
        for i in 0..a.len() {
            prop_assert_eq!(sum[i], a[i] + b[i]);
        }
        let (ha, hb) = (ta.to_dtype(DType::BF16).unwrap(), tb.to_dtype(DType::BF16).unwrap());
        let hsum = ha.add(&hb).unwrap().to_vec::<bf16>().unwrap();
        let (va, vb) = (ha.to_vec::<bf16>().unwrap(), hb.to_vec::<bf16>().unwrap());
        for i in 0..a.len() {
            prop_assert_eq!(hsum[i], bf16::from_f32(va[i].to_f32() + vb[i].to_f32()));
        }
    }
}
