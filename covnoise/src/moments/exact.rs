//! The shared driver of the exact per-example rules: from the probed layers
//! of one backward pass ([`ProbedLayer`]: each an [`ExactRule`] and its
//! output gradient) to sums over the batch of squared per-example gradients,
//! for any parameter covered by probed layers. What a layer kind computes is
//! its rule's business (see [`crate::probes`]); what every rule shares is
//! here:
//!
//! - A parameter used by several probed layers in one forward pass (tied
//!   weights) gets the sum of its uses' per-example gradients, squared. A
//!   parameter no probed layer covers is refused by name, never skipped.
//! - A rule's one-pass shortcut ([`ExactRule::square_sums`],
//!   [`ExactRule::trace`]) is taken when a single layer covers the
//!   parameter; otherwise examples go through in chunks, so that the
//!   per-example gradients (and a rule's intermediates, such as unfolded
//!   inputs) of one chunk are all that is held: about `CHUNK_BYTES` (64 MiB)
//!   per parameter, or one example's worth when that is larger.
//! - [`group_sums`]: the gradients of consecutive groups of examples
//!   (micro-batch gradients) from the same rules, summed (not squared) over
//!   a tied parameter's uses; a rule's batched shortcut
//!   ([`ExactRule::group_sums`]) where it has one, per-example gradients in
//!   chunks otherwise.
//! - [`check_rules_cover_gradients`]: the per-example gradients must add up
//!   to the backward pass's gradient, which refuses a wrong rule (naming the
//!   layer) and a parameter also used outside the probed layers.

use burn::tensor::Tensor;

use super::{MomentKind, SecondMoment};
use crate::error::{CovnoiseError, Remedy, Result};
use crate::params::ParamTable;
use crate::probes::{ExactRule, ProbedLayer};
use crate::tensor_util::scalar;

/// One use of a parameter by a probed layer: the layer's rule, the
/// parameter's position among the rule's parameters, and the layer's output
/// gradient.
pub(crate) type Use<'a> = (&'a dyn ExactRule, usize, &'a Tensor<2>);

/// The uses of each table parameter by the probed layers, in table order;
/// an error names a parameter that no probed layer covers. Parameters of
/// probed layers that the table does not hold (frozen) take no noise and
/// are skipped.
fn uses_by_param<'a>(layers: &'a [ProbedLayer], table: &ParamTable) -> Result<Vec<Vec<Use<'a>>>> {
    let mut uses: Vec<Vec<Use<'a>>> = vec![Vec::new(); table.len()];
    for layer in layers {
        for (k, id) in layer.rule.params().into_iter().enumerate() {
            if let Some(i) = table.index_of(id) {
                uses[i].push((layer.rule.as_ref(), k, &layer.output_grad));
            }
        }
    }
    if let Some(i) = uses.iter().position(Vec::is_empty) {
        let e = &table.entries()[i];
        return Err(CovnoiseError::Refused {
            problem: format!(
                "parameter {} (shape {:?}) has no per-example gradient rule: the exact and mc-fisher estimators cover layers routed through Probes (Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm, and any layer with an ExactRule of its own, via Probes::layer)",
                e.name, e.shape
            ),
            remedy: Remedy::MicrobatchEstimator,
        });
    }
    Ok(uses)
}

/// Examples a use's layer saw.
fn examples_of(u: &Use) -> usize {
    u.2.dims()[0]
}

/// The examples every use of a parameter saw; an error where its layers
/// saw different numbers.
fn common_examples(uses: &[Use]) -> Result<usize> {
    let examples = examples_of(&uses[0]);
    if let Some(u) = uses.iter().find(|u| examples_of(u) != examples) {
        return Err(CovnoiseError::Shape(format!(
            "it is used by probed layers that saw {examples} and {} examples",
            examples_of(u)
        )));
    }
    Ok(examples)
}

/// The layer kinds of `uses`, for messages.
fn kinds(uses: &[Use]) -> String {
    let mut k: Vec<String> = uses.iter().map(|u| u.0.layer()).collect();
    k.dedup();
    k.join(", ")
}

/// Per-example gradients of one parameter for examples `start..start+len`,
/// summed over its uses, `[len, numel]`.
fn summed_per_example(uses: &[Use], start: usize, len: usize, numel: usize) -> Result<Tensor<2>> {
    let mut total: Option<Tensor<2>> = None;
    for &(rule, k, grad) in uses {
        let g = rule.per_example(k, grad, start, len)?;
        if g.dims() != [len, numel] {
            return Err(CovnoiseError::Shape(format!(
                "the {} layer's rule gives per-example gradients of shape {:?} for {len} examples of a parameter of {numel} values",
                rule.layer(),
                g.dims()
            )));
        }
        total = Some(match total {
            None => g,
            Some(t) => t + g,
        });
    }
    Ok(total.expect("every parameter has a use"))
}

/// Sums over the batch of squared per-example gradients: per parameter
/// (`MomentKind::Diag`, flat and in table order) or in total
/// (`MomentKind::Trace`). `per_example_scale` turns a probe gradient into
/// the gradient of one example's own loss (B for a mean over B examples).
///
/// Every parameter of `table` must be covered by a probed layer; one used
/// by several (tied weights) gets the sum of its uses before the square.
pub fn moment_sums(
    layers: &[ProbedLayer],
    table: &ParamTable,
    per_example_scale: f32,
    kind: MomentKind,
) -> Result<SecondMoment> {
    let uses = uses_by_param(layers, table)?;
    // The per-example scale enters squared on the sums, once.
    let scale2 = per_example_scale * per_example_scale;
    let mut diag = Vec::with_capacity(table.len());
    let mut trace = 0.0;
    for (entry, uses) in table.entries().iter().zip(&uses) {
        let numel = entry.numel();
        if let [(rule, k, grad)] = uses.as_slice() {
            match kind {
                MomentKind::Diag => {
                    if let Some(s) = rule.square_sums(*k, grad) {
                        if s.dims() != [numel] {
                            return Err(CovnoiseError::Shape(format!(
                                "parameter {}: the {} layer's rule gives square sums of shape {:?} for a parameter of {numel} values",
                                entry.name,
                                rule.layer(),
                                s.dims()
                            )));
                        }
                        diag.push(s * scale2);
                        continue;
                    }
                }
                MomentKind::Trace => {
                    if let Some(t) = rule.trace(*k, grad) {
                        trace += scale2 as f64 * t;
                        continue;
                    }
                }
            }
        }
        let sums = square_sums_chunked(uses, numel, CHUNK_BYTES)
            .map_err(|e| name_shape_error(e, &entry.name))?
            * scale2;
        match kind {
            MomentKind::Diag => diag.push(sums),
            MomentKind::Trace => trace += scalar(sums.sum()),
        }
    }
    Ok(match kind {
        MomentKind::Diag => SecondMoment::Diag(diag),
        MomentKind::Trace => SecondMoment::Trace(trace),
    })
}

/// `sum_i g_i^2` of one parameter from its uses (per-example gradients
/// summed over the uses, then squared), over chunks of examples holding at
/// most `chunk_bytes` (at least one example).
pub(crate) fn square_sums_chunked(
    uses: &[Use],
    numel: usize,
    chunk_bytes: usize,
) -> Result<Tensor<1>> {
    let examples = common_examples(uses)?;
    let per_example: usize = uses.iter().map(|u| u.0.bytes_per_example(u.1, numel)).sum();
    let chunk = (chunk_bytes / per_example.max(1)).clamp(1, examples.max(1));
    let mut sums: Option<Tensor<1>> = None;
    let mut start = 0;
    while start < examples {
        let len = chunk.min(examples - start);
        let g = summed_per_example(uses, start, len, numel)?;
        let s = g.square().sum_dim(0).reshape([numel]);
        sums = Some(match sums {
            None => s,
            Some(acc) => acc + s,
        });
        start += len;
    }
    sums.ok_or_else(|| CovnoiseError::Shape("empty batch".into()))
}

/// The sums over consecutive groups of `group_size` examples of their
/// per-example gradients (of the differentiated objective, as the probes
/// give them), per parameter `[B / group_size, numel]` in table order. Every parameter of `table` must be covered
/// by a probed layer; a tied parameter's uses add up. Exact wherever the
/// rules are: examples of different groups must not interact (no batch
/// normalization), which the callers check.
pub fn group_sums(
    layers: &[ProbedLayer],
    table: &ParamTable,
    group_size: usize,
) -> Result<Vec<Tensor<2>>> {
    let uses = uses_by_param(layers, table)?;
    let mut out = Vec::with_capacity(table.len());
    for (entry, uses) in table.entries().iter().zip(&uses) {
        let groups = group_count(uses, &entry.name, group_size)?;
        out.push(param_group_rows(
            uses,
            &entry.name,
            entry.numel(),
            groups,
            group_size,
        )?);
    }
    Ok(out)
}

/// How many groups of `group_size` examples a parameter's uses hold: an
/// error naming the parameter where they do not split into whole groups.
fn group_count(uses: &[Use], name: &str, group_size: usize) -> Result<usize> {
    let examples = common_examples(uses).map_err(|e| name_shape_error(e, name))?;
    if group_size == 0 || !examples.is_multiple_of(group_size) {
        return Err(CovnoiseError::Shape(format!(
            "parameter {name}: {examples} examples do not split into groups of {group_size}"
        )));
    }
    Ok(examples / group_size)
}

/// One parameter's group sums `[groups, numel]` from its uses, added up.
fn param_group_rows(
    uses: &[Use],
    name: &str,
    numel: usize,
    groups: usize,
    group_size: usize,
) -> Result<Tensor<2>> {
    let mut total: Option<Tensor<2>> = None;
    for use_ in uses {
        let (rule, k, grad) = *use_;
        let g = match rule.group_sums(k, grad, group_size) {
            Some(g) => g,
            None => group_sums_chunked(use_, numel, group_size, CHUNK_BYTES)
                .map_err(|e| name_shape_error(e, name))?,
        };
        if g.dims() != [groups, numel] {
            return Err(CovnoiseError::Shape(format!(
                "parameter {name}: the {} layer's rule gives group gradients of shape {:?} for {groups} groups of a parameter of {numel} values",
                rule.layer(),
                g.dims()
            )));
        }
        total = Some(match total {
            None => g,
            Some(t) => t + g,
        });
    }
    Ok(total.expect("every parameter has a use"))
}

/// The group sums of [`group_sums`] summarized per parameter, in table
/// order: their sum over the groups `Σ_g s_g` and their centered sum of
/// squares `Σ_g (s_g - s̄)²`, `[numel]` each, and the number of groups. A
/// parameter one layer alone covers takes them from its rule where the
/// backward pass formed them ([`ExactRule::group_moments`]: no `[groups,
/// numel]` rows at all); otherwise (tied parameters add up per group
/// before the square) from the rows.
pub fn group_moments(
    layers: &[ProbedLayer],
    table: &ParamTable,
    group_size: usize,
) -> Result<(usize, Vec<Tensor<1>>, Vec<Tensor<1>>)> {
    let uses = uses_by_param(layers, table)?;
    let (mut sums, mut centered) = (Vec::new(), Vec::new());
    let mut groups = 0;
    for (entry, uses) in table.entries().iter().zip(&uses) {
        let numel = entry.numel();
        groups = group_count(uses, &entry.name, group_size)?;
        let given = match uses.as_slice() {
            [(rule, k, grad)] => rule.group_moments(*k, grad, group_size).filter(|m| {
                m.groups == groups && m.sum.dims() == [numel] && m.centered.dims() == [numel]
            }),
            _ => None,
        };
        let (s, c) = match given {
            Some(m) => (m.sum, m.centered),
            None => {
                let rows = param_group_rows(uses, &entry.name, numel, groups, group_size)?;
                let s = rows.clone().sum_dim(0).reshape([numel]);
                let mean = s.clone() / groups as f32;
                let c = crate::kernels::centered_square_sum(&rows, &mean).unwrap_or_else(|| {
                    (rows - mean.unsqueeze::<2>())
                        .square()
                        .sum_dim(0)
                        .reshape([numel])
                });
                (s, c)
            }
        };
        sums.push(s);
        centered.push(c);
    }
    Ok((groups, sums, centered))
}

/// One use's group sums from its per-example gradients: whole groups per
/// call while a group's gradients fit in `chunk_bytes`, otherwise each
/// group in chunks of at least one example.
fn group_sums_chunked(
    use_: &Use,
    numel: usize,
    group_size: usize,
    chunk_bytes: usize,
) -> Result<Tensor<2>> {
    let (rule, k, grad) = *use_;
    let examples = grad.dims()[0];
    let groups = examples / group_size;
    let chunk = (chunk_bytes / rule.bytes_per_example(k, numel).max(1)).max(1);
    // The per-example gradients of this one use, shape-checked.
    let rows_of = |start: usize, len: usize| {
        summed_per_example(std::slice::from_ref(use_), start, len, numel)
    };
    let mut rows = Vec::new();
    if chunk >= group_size {
        let per_call = (chunk / group_size).min(groups);
        let mut g0 = 0;
        while g0 < groups {
            let count = per_call.min(groups - g0);
            let len = count * group_size;
            let g = rows_of(g0 * group_size, len)?;
            rows.push(
                g.reshape([count, group_size, numel])
                    .sum_dim(1)
                    .reshape([count, numel]),
            );
            g0 += count;
        }
    } else {
        for g0 in 0..groups {
            let mut sum: Option<Tensor<2>> = None;
            let mut start = g0 * group_size;
            let end = start + group_size;
            while start < end {
                let len = chunk.min(end - start);
                let g = rows_of(start, len)?.sum_dim(0);
                sum = Some(match sum {
                    None => g,
                    Some(s) => s + g,
                });
                start += len;
            }
            rows.push(sum.expect("a group has examples"));
        }
    }
    Ok(Tensor::cat(rows, 0))
}

/// A shape error about a parameter, with the parameter's name.
fn name_shape_error(e: CovnoiseError, name: &str) -> CovnoiseError {
    match e {
        CovnoiseError::Shape(m) => CovnoiseError::Shape(format!("parameter {name}: {m}")),
        other => other,
    }
}

/// Checks that the per-example gradients the rules give add up to the
/// backward pass's gradient `grads` (flat, table order) of the mean
/// objective over the examples: a wrong rule (a user's, say) gives another
/// sum and is refused naming its layer, and so is a parameter that is also
/// used outside the probed layers (a tied weight read directly, a layer
/// called without its probe), whose estimate would miss part of its
/// gradient. `tolerance` is relative to the larger of the two norms.
pub fn check_rules_cover_gradients(
    layers: &[ProbedLayer],
    table: &ParamTable,
    grads: &[Tensor<1>],
    tolerance: f64,
) -> Result<()> {
    let uses = uses_by_param(layers, table)?;
    for ((entry, uses), g) in table.entries().iter().zip(&uses).zip(grads) {
        let numel = entry.numel();
        let examples = examples_of(&uses[0]);
        let sum = summed_per_example(uses, 0, examples, numel)
            .map_err(|e| name_shape_error(e, &entry.name))?
            .sum_dim(0)
            .reshape([numel]);
        // The probe gradients are of the mean objective already: their sum
        // over examples is the batch gradient itself.
        check_sum(
            &entry.name,
            uses,
            sum,
            g,
            tolerance,
            "per-example gradients",
        )?;
    }
    Ok(())
}

/// As [`check_rules_cover_gradients`] for a pass over whole groups of
/// examples that interact (ghost batch normalization): the rules' group
/// sums over the pass's examples as one group ([`ExactRule::group_sums`],
/// which a batch norm's rule gives over whole normalization groups only)
/// must add up to the gradient of every parameter. Where they do, the
/// gradients of micro-batches made of whole groups come from one pass.
pub fn check_group_sums_cover_gradients(
    layers: &[ProbedLayer],
    table: &ParamTable,
    grads: &[Tensor<1>],
    tolerance: f64,
) -> Result<()> {
    let examples = layers.first().map_or(0, |l| l.output_grad.dims()[0]);
    let sums = group_sums(layers, table, examples)?;
    let uses = uses_by_param(layers, table)?;
    for (((entry, uses), g), sum) in table.entries().iter().zip(&uses).zip(grads).zip(sums) {
        let sum = sum.reshape([entry.numel()]);
        check_sum(
            &entry.name,
            uses,
            sum,
            g,
            tolerance,
            "gradients over whole groups",
        )?;
    }
    Ok(())
}

/// Refuses parameter `name` when its rules' sum `sum` is more than
/// `tolerance` (relative) away from its gradient `g`.
fn check_sum(
    name: &str,
    uses: &[Use],
    sum: Tensor<1>,
    g: &Tensor<1>,
    tolerance: f64,
    what: &str,
) -> Result<()> {
    let diff = scalar((sum.clone() - g.clone()).square().sum()).sqrt();
    let scale = scalar(sum.square().sum())
        .sqrt()
        .max(scalar(g.clone().square().sum()).sqrt());
    if diff > tolerance * scale + 1e-30 {
        return Err(CovnoiseError::Refused {
            problem: format!(
                "parameter {name}: the {what} of its {} rule add up to {diff:.3e} away from its gradient of norm {scale:.3e}: the rule is wrong, or the parameter is also used outside the layers routed through Probes",
                kinds(uses),
            ),
            remedy: Remedy::RouteThroughProbes,
        });
    }
    Ok(())
}

/// Bytes of per-example gradients (and a rule's intermediates) one chunk of
/// examples may hold (see the module documentation).
const CHUNK_BYTES: usize = 64 << 20;
