//! Small conversions between burn tensors and host vectors.

use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{CovnoiseError, Result};

/// Copies a float tensor's values to a host vector (row-major).
pub fn to_vec<const D: usize>(t: &Tensor<D>) -> Result<Vec<f32>> {
    t.to_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| CovnoiseError::Backend(format!("reading tensor data: {e:?}")))
}

/// Builds a float tensor of `shape` from a row-major host vector.
pub fn from_vec<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    debug_assert_eq!(values.len(), shape.iter().product::<usize>());
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// The value of a one-element tensor as `f64`.
pub fn scalar<const D: usize>(t: Tensor<D>) -> f64 {
    t.into_scalar::<f32>() as f64
}

/// Builds a rank-1 float tensor from a host vector.
pub fn from_vec1(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}
