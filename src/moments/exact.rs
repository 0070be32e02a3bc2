//! Exact per-example second moments of Linear layers from the factors of one
//! backward pass, without forming per-example gradients.
//!
//! For a Linear layer `z_i = a_i W + b` (burn's layout, `W` is `[in, out]`),
//! example i's weight gradient is the outer product `a_i^T delta_i`, so
//! `sum_i (grad_W l_i)^2 = (a^2)^T (delta^2)` (elementwise squares; one extra
//! matrix product per layer), `sum_i (grad_b l_i)^2 = sum_i delta_i^2`, and
//! the squared norm `||grad_W l_i||^2 = ||a_i||^2 ||delta_i||^2` gives the
//! trace in O(B (in + out)).

use burn::tensor::Tensor;

use super::{MomentKind, SecondMoment};
use crate::error::{CovnoiseError, Result};
use crate::model::LinearFactors;
use crate::params::ParamTable;
use crate::tensor_util::scalar;

/// Sums over the batch of squared per-example gradients: per parameter
/// (`MomentKind::Diag`, flat and in table order) or in total
/// (`MomentKind::Trace`). `per_example_scale` turns a probe gradient into
/// the gradient of one example's own loss (B for a mean over B examples).
///
/// Every parameter of `table` must be covered by exactly one probed layer:
/// a parameter without a per-example rule, or one used by two layers (whose
/// per-example gradient would be a sum of two products), is refused with its
/// name, never skipped.
pub fn moment_sums(
    factors: &[LinearFactors],
    table: &ParamTable,
    per_example_scale: f32,
    kind: MomentKind,
) -> Result<SecondMoment> {
    let mut slots: Vec<Option<Tensor<1>>> = vec![None; table.len()];
    let mut covered = vec![false; table.len()];
    let mut trace = 0.0;
    for f in factors {
        let weight = claim(table, &mut covered, f.weight)?;
        let bias = match f.bias {
            Some(b) => claim(table, &mut covered, b)?,
            None => None,
        };
        if weight.is_none() && bias.is_none() {
            continue;
        }
        let delta = f.output_grad.clone() * per_example_scale;
        let d2 = delta.square();
        match kind {
            MomentKind::Diag => {
                if let Some(weight) = weight {
                    let w = f.input.clone().square().transpose().matmul(d2.clone());
                    let n = w.shape().num_elements();
                    slots[weight] = Some(w.reshape([n]));
                }
                if let Some(b) = bias {
                    let s = d2.sum_dim(0);
                    let n = s.shape().num_elements();
                    slots[b] = Some(s.reshape([n]));
                }
            }
            MomentKind::Trace => {
                let d2 = d2.sum_dim(1);
                // weight: sum_i |a_i|^2 |delta_i|^2; bias: sum_i |delta_i|^2.
                let a2 = match weight {
                    Some(_) => f.input.clone().square().sum_dim(1),
                    None => d2.zeros_like(),
                };
                let a2 = if bias.is_some() { a2 + 1.0 } else { a2 };
                trace += scalar((a2 * d2).sum());
            }
        }
    }
    if let Some(i) = covered.iter().position(|c| !c) {
        let e = &table.entries()[i];
        return Err(CovnoiseError::Unsupported(format!(
            "parameter {} (shape {:?}) has no per-example gradient rule: the exact and mc-fisher estimators cover Linear layers routed through Probes::linear; use --estimator microbatch for other layers",
            e.name, e.shape
        )));
    }
    Ok(match kind {
        MomentKind::Diag => SecondMoment::Diag(
            slots
                .into_iter()
                .map(|s| s.expect("every parameter covered"))
                .collect(),
        ),
        MomentKind::Trace => SecondMoment::Trace(trace),
    })
}

/// Marks parameter `id` as covered by a probed layer and returns its index;
/// None for a frozen parameter (not in the table: it takes no noise).
fn claim(
    table: &ParamTable,
    covered: &mut [bool],
    id: burn::module::ParamId,
) -> Result<Option<usize>> {
    let Some(i) = table.index_of(id) else {
        return Ok(None);
    };
    if covered[i] {
        return Err(CovnoiseError::Unsupported(format!(
            "parameter {} is used by more than one probed layer in a forward pass; its per-example gradient is then a sum the exact estimator does not form (use --estimator microbatch)",
            table.entries()[i].name
        )));
    }
    covered[i] = true;
    Ok(Some(i))
}
