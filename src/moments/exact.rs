//! Exact per-example second moments of Linear layers from the factors of one
//! backward pass, without forming per-example gradients.
//!
//! For a Linear layer `z_i = a_i W + b`, example i's weight gradient is the
//! outer product `a_i^T delta_i`, so
//! `sum_i (grad_W l_i)^2 = (a^2)^T (delta^2)` (elementwise squares; one extra
//! matrix product per layer), `sum_i (grad_b l_i)^2 = sum_i delta_i^2`, and the
//! squared norm `||grad_W l_i||^2 = ||a_i||^2 ||delta_i||^2` gives the trace
//! in O(B (in + out)).

use burn::tensor::Tensor;

use super::{MomentKind, SecondMoment};
use crate::error::{CovnoiseError, Result};
use crate::model::{LinearFactors, ParamInfo};
use crate::tensor_util::scalar;

/// Sums over the batch of squared per-example gradients: per parameter
/// (`MomentKind::Diag`) or in total (`MomentKind::Trace`). Every parameter
/// must belong to a Linear layer with factors; any other parameter is
/// refused, never skipped.
pub fn moment_sums(
    factors: &[LinearFactors],
    info: &[ParamInfo],
    kind: MomentKind,
) -> Result<SecondMoment> {
    let mut covered = vec![false; info.len()];
    for f in factors {
        covered[f.weight] = true;
        covered[f.bias] = true;
    }
    if let Some(i) = covered.iter().position(|c| !c) {
        return Err(CovnoiseError::Unsupported(format!(
            "parameter {} ({:?}) has no per-example gradient rule",
            info[i].name, info[i].kind
        )));
    }
    match kind {
        MomentKind::Diag => {
            let mut out: Vec<Option<Tensor<2>>> = vec![None; info.len()];
            for f in factors {
                let d2 = f.output_grad.clone().square();
                out[f.weight] = Some(f.input.clone().square().transpose().matmul(d2.clone()));
                out[f.bias] = Some(d2.sum_dim(0));
            }
            Ok(SecondMoment::Diag(
                out.into_iter()
                    .map(|t| t.expect("every parameter covered"))
                    .collect(),
            ))
        }
        MomentKind::Trace => {
            let mut total = 0.0;
            for f in factors {
                let d2 = f.output_grad.clone().square().sum_dim(1);
                let a2 = f.input.clone().square().sum_dim(1);
                // weight: sum_i |a_i|^2 |delta_i|^2; bias: sum_i |delta_i|^2.
                total += scalar(((a2 + 1.0) * d2).sum());
            }
            Ok(SecondMoment::Trace(total))
        }
    }
}
