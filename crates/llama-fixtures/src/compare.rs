//! Comparing computed tensors with reference ones by relative error.

use std::fmt;

/// f32 values widened to f64, for feeding f64 reference implementations.
pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&v| f64::from(v)).collect()
}

/// f64 values rounded to f32, for comparing f64 results with [`assert_close`].
pub fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&v| v as f32).collect()
}

/// ‖actual − expected‖₂ / ‖expected‖₂ in f64 (the absolute norm when `expected` is all zeros).
/// NaN anywhere gives NaN, which fails every tolerance.
pub fn rel_error(actual: &[f32], expected: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&a, &e) in actual.iter().zip(expected) {
        let d = f64::from(a) - f64::from(e);
        diff += d * d;
        norm += f64::from(e) * f64::from(e);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Why two tensors were judged different.
#[derive(Debug)]
pub struct Mismatch {
    pub name: String,
    pub shape: Vec<usize>,
    pub rel_error: f64,
    pub tolerance: f64,
    /// Largest |actual − expected|, its flat index and the values there.
    pub max_abs_diff: f64,
    pub worst_index: usize,
    pub worst_actual: f32,
    pub worst_expected: f32,
    /// Set when the lengths differ; the other fields are then not meaningful.
    pub lengths: Option<(usize, usize)>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((actual, expected)) = self.lengths {
            return write!(
                f,
                "{}: {actual} values computed, {expected} expected (shape {:?})",
                self.name, self.shape
            );
        }
        write!(
            f,
            "{}: shape {:?}: relative error {:.3e} exceeds {:.1e}; max |diff| {:.3e} at {:?} \
             (flat {}): got {}, expected {}",
            self.name,
            self.shape,
            self.rel_error,
            self.tolerance,
            self.max_abs_diff,
            unravel(self.worst_index, &self.shape),
            self.worst_index,
            self.worst_actual,
            self.worst_expected,
        )
    }
}

/// Compares `actual` with `expected` (of shape `shape`) and returns the mismatch, if any.
pub fn check_close(
    name: &str,
    actual: &[f32],
    expected: &[f32],
    shape: &[usize],
    tolerance: f64,
) -> Result<f64, Box<Mismatch>> {
    let mut mismatch = Mismatch {
        name: name.to_string(),
        shape: shape.to_vec(),
        rel_error: f64::NAN,
        tolerance,
        max_abs_diff: 0.0,
        worst_index: 0,
        worst_actual: 0.0,
        worst_expected: 0.0,
        lengths: None,
    };
    if actual.len() != expected.len() {
        mismatch.lengths = Some((actual.len(), expected.len()));
        return Err(Box::new(mismatch));
    }
    let rel = rel_error(actual, expected);
    if rel <= tolerance {
        return Ok(rel);
    }
    mismatch.rel_error = rel;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let d = (f64::from(a) - f64::from(e)).abs();
        if d > mismatch.max_abs_diff || d.is_nan() {
            (mismatch.max_abs_diff, mismatch.worst_index) = (d, i);
            (mismatch.worst_actual, mismatch.worst_expected) = (a, e);
            if d.is_nan() {
                break;
            }
        }
    }
    Err(Box::new(mismatch))
}

/// Panics with a [`Mismatch`] message unless the relative error is at most `tolerance`;
/// returns the relative error otherwise.
pub fn assert_close(
    name: &str,
    actual: &[f32],
    expected: &[f32],
    shape: &[usize],
    tolerance: f64,
) -> f64 {
    match check_close(name, actual, expected, shape, tolerance) {
        Ok(rel) => rel,
        Err(mismatch) => panic!("{mismatch}"),
    }
}

/// The multi-dimensional index of flat index `i` in a row-major `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = i % dim;
            i /= dim;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_tensors_pass_with_zero_error() {
        let x = [1.0, -2.0, 3.5];
        assert_eq!(assert_close("x", &x, &x, &[3], 0.0), 0.0);
    }

    #[test]
    fn mismatch_names_tensor_shape_and_worst_element() {
        let expected = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut actual = expected;
        actual[4] = 5.5;
        let m = check_close("w", &actual, &expected, &[2, 3], 1e-5).unwrap_err();
        assert_eq!(m.worst_index, 4);
        let msg = m.to_string();
        assert!(msg.contains("w: shape [2, 3]"), "{msg}");
        assert!(msg.contains("at [1, 1]"), "{msg}");
        assert!(msg.contains("got 5.5, expected 5"), "{msg}");
    }

    #[test]
    fn nan_never_passes() {
        let m = check_close("n", &[f32::NAN], &[1.0], &[1], 1.0).unwrap_err();
        assert!(m.max_abs_diff.is_nan());
    }

    #[test]
    fn length_mismatch_is_reported() {
        let m = check_close("l", &[1.0], &[1.0, 2.0], &[2], 1.0).unwrap_err();
        assert!(m.to_string().contains("1 values computed, 2 expected"));
    }

    #[test]
    fn relative_error_is_scale_free() {
        let e = [1e-3f32, 2e-3];
        let a = [1.1e-3f32, 2.2e-3];
        let rel = rel_error(&a, &e);
        assert!((rel - 0.1).abs() < 1e-6, "{rel}");
    }
}
