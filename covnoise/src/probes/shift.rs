//! Passes in which each group of consecutive examples meets parameters of
//! its own, `theta + s_j` for group j ([`GroupShifts`], [`Probes::shifted`]):
//! the penalties' finite differences `grad L_m(theta + eps_m g_m)`, one per
//! micro-batch, as one pass over the batch instead of one small pass per
//! micro-batch.
//!
//! Each of covnoise's probed layers runs its groups at their own
//! parameters: `Linear` as one batched product with a weight per group,
//! `Conv2d` on the fast kernel with a weight per group of examples
//! ([`crate::kernels::conv2d_per_group`]), `Conv1d` through the same,
//! `Embedding` by looking the tokens up in the groups' stacked tables, and
//! the normalizations' affine parts by broadcasting. The shifted copies are
//! built from the parameter (`theta` broadcast plus the shifts), so each
//! group's gradient flows back to `theta`: the pass's parameter gradient is
//! the sum over the groups of each group's gradient at its own parameters.
//! A layer that computes its output itself ([`Probes::layer`], a batch
//! norm) cannot be moved: when it holds a shifted parameter the pass is
//! refused ([`Probes::unshifted_layers`]), never silently run at `theta`.

use std::collections::HashMap;

use burn::module::{Param, ParamId};
use burn::nn::conv::{Conv1d, Conv2d};
use burn::nn::{Embedding, GroupNorm, LayerNorm, Linear, PaddingConfig1d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Int, Tensor};

use super::Probes;
use crate::error::{CovnoiseError, Result};
use crate::kernels::{self, same_padding};
use crate::params::ParamTable;

/// Per-group parameter shifts for a pass over G consecutive groups of
/// `group_size` examples: for each shifted parameter, a row per group
/// (`[G, numel]`, the parameter flattened as its tensor is laid out), and a
/// factor per group (1 unless set by [`GroupShifts::with_factors`]). Group
/// j's examples meet `theta + factor_j row_j`; parameters without rows are
/// not moved.
#[derive(Debug, Clone)]
pub struct GroupShifts {
    group_size: usize,
    groups: usize,
    rows: HashMap<ParamId, Tensor<2>>,
    factors: Vec<f32>,
}

impl GroupShifts {
    /// Shifts for the parameters of `table`, in table order (`rows[i]` is
    /// `[G, numel]` for entry i), for groups of `group_size` examples.
    pub fn from_table(table: &ParamTable, group_size: usize, rows: Vec<Tensor<2>>) -> Result<Self> {
        let entries = table.entries();
        if rows.len() != entries.len() {
            return Err(CovnoiseError::Shape(format!(
                "{} rows of shifts for {} parameters",
                rows.len(),
                entries.len()
            )));
        }
        let groups = rows.first().map_or(0, |r| r.dims()[0]);
        if group_size == 0 || groups == 0 {
            return Err(CovnoiseError::Shape(
                "shifts need at least one group of at least one example".into(),
            ));
        }
        let mut map = HashMap::new();
        for (e, r) in entries.iter().zip(rows) {
            if r.dims() != [groups, e.numel()] {
                return Err(CovnoiseError::Shape(format!(
                    "the shifts of {} are {:?}, not [{groups}, {}]",
                    e.name,
                    r.dims(),
                    e.numel()
                )));
            }
            map.insert(e.id, r);
        }
        Ok(Self {
            group_size,
            groups,
            rows: map,
            factors: vec![1.0; groups],
        })
    }

    /// The same shifts with group j's rows scaled by `factors[j]` (the
    /// rows are not rewritten: the layers apply the factors as they form
    /// each group's parameters).
    pub fn with_factors(self, factors: Vec<f32>) -> Result<Self> {
        if factors.len() != self.groups {
            return Err(CovnoiseError::Shape(format!(
                "{} factors for {} groups of shifts",
                factors.len(),
                self.groups
            )));
        }
        Ok(Self { factors, ..self })
    }

    /// Examples per group.
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// Number of groups G.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Whether `param` is moved.
    pub fn shifts(&self, param: ParamId) -> bool {
        self.rows.contains_key(&param)
    }

    /// The shifts of groups `first .. first + count` (a chunk of the pass).
    pub fn narrow(&self, first: usize, count: usize) -> Self {
        Self {
            group_size: self.group_size,
            groups: count,
            rows: self
                .rows
                .iter()
                .map(|(id, r)| (*id, r.clone().narrow(0, first, count)))
                .collect(),
            factors: self.factors[first..first + count].to_vec(),
        }
    }

    /// The shifts `s_j` of `param` (whose value has shape `dims`), `[G,
    /// dims]` (E = D + 1), as constants on `device`'s kind (untracked on an
    /// autodiff device), or None where `param` is not moved.
    fn shift<const D: usize, const E: usize>(
        &self,
        param: ParamId,
        dims: [usize; D],
        autodiff: bool,
    ) -> Option<Tensor<E>> {
        assert_eq!(E, D + 1, "one more dimension for the groups");
        let (rows, factors) = self.unscaled(param)?;
        let mut shape = [self.groups; E];
        shape[1..].copy_from_slice(&dims);
        let mut shift: Tensor<E> = rows.reshape(shape);
        if factors.iter().any(|&f| f != 1.0) {
            let mut column = [1; E];
            column[0] = self.groups;
            let device = shift.device();
            shift = shift * crate::tensor_util::from_vec(factors.to_vec(), column, &device);
        }
        Some(if autodiff && !shift.is_autodiff() {
            shift.autodiff()
        } else {
            shift
        })
    }

    /// The rows of `param` `[G, numel]` and the groups' factors, or None
    /// where `param` is not moved.
    fn unscaled(&self, param: ParamId) -> Option<(Tensor<2>, &[f32])> {
        Some((self.rows.get(&param)?.clone(), &self.factors))
    }

    /// `theta + s_j` for each group, `[G, dims of theta]` (E = D + 1), or
    /// None where `param` is not moved. Built from `value` (with its
    /// autodiff graph), so the groups' gradients flow back to it.
    fn moved<const D: usize, const E: usize>(
        &self,
        param: ParamId,
        value: Tensor<D>,
    ) -> Option<Tensor<E>> {
        let shift = self.shift::<D, E>(param, value.dims(), value.is_autodiff())?;
        Some(value.unsqueeze_dim::<E>(0) + shift)
    }

    /// A layer's bias moved for each group, `[G, out]`, or None where the
    /// layer has none or it is not moved.
    fn moved_bias(&self, bias: &Option<Param<Tensor<1>>>) -> Option<Tensor<2>> {
        bias.as_ref()
            .and_then(|b| self.moved::<1, 2>(b.id, b.val()))
    }

    /// The groups' values of a parameter `[n]`, `[G, n]`: moved where it is,
    /// repeated where not.
    pub(super) fn per_group_values(&self, p: &Param<Tensor<1>>) -> Tensor<2> {
        self.moved::<1, 2>(p.id, p.val())
            .unwrap_or_else(|| self.repeated(p.val()))
    }

    /// `theta` repeated for each group, `[G, dims]`, for a layer whose
    /// other parameter is moved.
    fn repeated<const D: usize, const E: usize>(&self, value: Tensor<D>) -> Tensor<E> {
        let mut dims = [self.groups; E];
        dims[1..].copy_from_slice(&value.dims());
        value.unsqueeze_dim::<E>(0).expand(dims)
    }

    /// Examples per group of a batch of `batch`, checked.
    fn per_group(&self, batch: usize) -> usize {
        assert_eq!(
            batch,
            self.groups * self.group_size,
            "a shifted pass over {} groups of {} examples saw a batch of {batch}",
            self.groups,
            self.group_size
        );
        self.group_size
    }

    /// A `Linear` layer on `[B, ..., in]`, each group through its own
    /// weight and bias: one product per group at its own weight, and the
    /// weight's gradient the whole batch's single product
    /// ([`kernels::linear_per_group`]); the biases broadcast per group.
    pub(super) fn linear<const D: usize>(&self, layer: &Linear, x: Tensor<D>) -> Tensor<D> {
        let w = self.unscaled(layer.weight.id);
        let bias = self.moved_bias(&layer.bias);
        if w.is_none() && bias.is_none() {
            return layer.forward(x);
        }
        let dims = x.dims();
        let b = self.per_group(dims[0]);
        let (i, o) = (dims[D - 1], layer.weight.dims()[1]);
        let rows = b * dims[1..D - 1].iter().product::<usize>();
        let flat = x.reshape([self.groups * rows, i]);
        let y = match w {
            Some((rows, factors)) => {
                let rows = rows.reshape([self.groups, i, o]);
                kernels::linear_per_group(flat, layer.weight.val(), rows, factors)
            }
            None => flat.matmul(layer.weight.val()),
        };
        let mut y = y.reshape([self.groups, rows, o]);
        if let Some(bias) = bias {
            y = y + bias.unsqueeze_dim::<3>(1);
        } else if let Some(bias) = &layer.bias {
            y = y + bias.val().unsqueeze::<3>();
        }
        let mut out = dims;
        out[D - 1] = o;
        y.reshape(out)
    }

    /// A `Conv2d` layer on `[B, C, H, W]`, each group with its own weight
    /// and bias.
    pub(super) fn conv2d(&self, layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        let w = self.moved::<4, 5>(layer.weight.id, layer.weight.val());
        let bias = self.moved_bias(&layer.bias);
        if w.is_none() && bias.is_none() {
            return kernels::conv2d_layer(layer, x);
        }
        self.per_group(x.dims()[0]);
        let options = kernels::layer_options(layer, &x);
        let w = w.unwrap_or_else(|| self.repeated(layer.weight.val()));
        let bias = bias.or_else(|| layer.bias.as_ref().map(|b| self.repeated(b.val())));
        kernels::conv2d_per_group(x, w, bias, options)
    }

    /// A `Conv1d` layer on `[B, C, L]`, as a convolution of height 1.
    pub(super) fn conv1d(&self, layer: &Conv1d, x: Tensor<3>) -> Tensor<3> {
        let w = self.moved::<3, 4>(layer.weight.id, layer.weight.val());
        let bias = self.moved_bias(&layer.bias);
        if w.is_none() && bias.is_none() {
            return layer.forward(x);
        }
        let [batch, c, l] = x.dims();
        self.per_group(batch);
        let (left, right) = match layer.padding {
            PaddingConfig1d::Valid => (0, 0),
            PaddingConfig1d::Same => same_padding(l, layer.kernel_size, layer.stride),
            PaddingConfig1d::Explicit(left, right) => (left, right),
        };
        let options = ConvOptions::new_with_padding(
            [1, layer.stride],
            [(0, 0), (left, right)],
            [1, layer.dilation],
            layer.groups,
        );
        let w: Tensor<4> = w.unwrap_or_else(|| self.repeated(layer.weight.val()));
        let [g, o, ci, k] = w.dims();
        let bias = bias.or_else(|| layer.bias.as_ref().map(|b| self.repeated(b.val())));
        let y = kernels::conv2d_per_group(
            x.reshape([batch, c, 1, l]),
            w.reshape([g, o, ci, 1, k]),
            bias,
            options,
        );
        let [_, co, _, lo] = y.dims();
        y.reshape([batch, co, lo])
    }

    /// An `Embedding` on tokens `[B, T]`: group j looks its tokens up in
    /// the j-th of the groups' stacked tables.
    pub(super) fn embedding(&self, layer: &Embedding, tokens: Tensor<2, Int>) -> Tensor<3> {
        let Some(table) = self.moved::<2, 3>(layer.weight.id, layer.weight.val()) else {
            return layer.forward(tokens);
        };
        let [batch, t] = tokens.dims();
        let b = self.per_group(batch);
        let [g, v, d] = table.dims();
        let offsets = Tensor::<1, Int>::arange(0..g as i64, &tokens.device())
            .mul_scalar(v as i64)
            .reshape([g, 1, 1])
            .expand([g, b, t])
            .reshape([batch, t]);
        burn::tensor::module::embedding(table.reshape([g * v, d]), tokens + offsets)
    }

    /// A `LayerNorm` on `[B, ..., features]`, each group with its own
    /// scale and shift.
    pub(super) fn layer_norm<const D: usize>(&self, layer: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
        if !self.shifts(layer.gamma.id) && !layer.beta.as_ref().is_some_and(|b| self.shifts(b.id)) {
            return layer.forward(x);
        }
        // The layer with unit scale and no shift normalizes with its own
        // epsilon (a private field); the constant unit scale takes no
        // gradient.
        let mut unit = layer.clone();
        let f = x.dims()[D - 1];
        unit.gamma = Param::initialized(ParamId::new(), Tensor::ones([f], &x.device()));
        unit.beta = None;
        let normalized = unit.forward(x);
        self.affine(normalized, Some(&layer.gamma), layer.beta.as_ref(), D - 1)
    }

    /// A `GroupNorm` on `[B, C, ...]`, each group of examples with its own
    /// scale and shift.
    pub(super) fn group_norm<const D: usize>(&self, layer: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
        let moved = |p: &Option<Param<Tensor<1>>>| p.as_ref().is_some_and(|p| self.shifts(p.id));
        if !moved(&layer.gamma) && !moved(&layer.beta) {
            return layer.forward(x);
        }
        let unit = burn::nn::norm::GroupNormConfig::new(layer.num_groups, layer.num_channels)
            .with_epsilon(layer.epsilon)
            .with_affine(false)
            .init(&x.device());
        let normalized = unit.forward(x);
        self.affine(normalized, layer.gamma.as_ref(), layer.beta.as_ref(), 1)
    }

    /// A normalization's affine part `x̂ gamma + beta` on the normalized
    /// input `normalized` `[B, ...]`, each group with its own gamma and
    /// beta (`[features]`), the features on `axis` (1 or the last).
    pub(super) fn affine<const D: usize>(
        &self,
        normalized: Tensor<D>,
        gamma: Option<&Param<Tensor<1>>>,
        beta: Option<&Param<Tensor<1>>>,
        axis: usize,
    ) -> Tensor<D> {
        let dims = normalized.dims();
        let b = self.per_group(dims[0]);
        let f = dims[axis];
        let before: usize = dims[1..axis].iter().product::<usize>() * b;
        let after: usize = dims[axis + 1..].iter().product();
        let x = normalized.reshape([self.groups, before, f, after]);
        let per_group = |p: &Param<Tensor<1>>| -> Tensor<4> {
            let v: Tensor<2> = self
                .moved::<1, 2>(p.id, p.val())
                .unwrap_or_else(|| p.val().unsqueeze::<2>());
            let rows = v.dims()[0];
            v.reshape([rows, 1, f, 1])
        };
        let mut y = x;
        if let Some(gamma) = gamma {
            y = y * per_group(gamma);
        }
        if let Some(beta) = beta {
            y = y + per_group(beta);
        }
        y.reshape(dims)
    }
}

impl Probes {
    /// Probes for a pass in which group j of the batch's consecutive groups
    /// meets the parameters `theta + s_j` of `shifts` (see the module
    /// documentation): covnoise's probed layers run each group at its own
    /// parameters (a batch norm over the whole batch normalizes each group
    /// alone, as one pass per group would), and nothing is recorded. The
    /// batch must be `shifts`' groups times its group size.
    pub fn shifted(shifts: GroupShifts) -> Self {
        Self {
            mode: super::Mode::Shifted,
            norm_group: Some(shifts.group_size()),
            shifts: Some(shifts),
            ..Self::default()
        }
    }

    /// The layers of the last pass that hold moved parameters but computed
    /// their output themselves, at `theta` ([`Probes::layer`], a batch
    /// norm): a shifted pass that has any is wrong and must be refused.
    pub fn unshifted_layers(&self) -> &[String] {
        &self.unshifted
    }

    /// Notes a layer that computes its output itself, with its
    /// parameters, in a shifted pass: wrong where any of them is moved.
    pub(super) fn note_unshifted(&mut self, layer: impl FnOnce() -> String, params: &[ParamId]) {
        if let Some(shifts) = &self.shifts
            && params.iter().any(|p| shifts.shifts(*p))
        {
            self.unshifted.push(layer());
        }
    }

    /// The shifts of a shifted pass (None outside one).
    pub(super) fn group_shifts(&self) -> Option<&GroupShifts> {
        self.shifts.as_ref()
    }
}
