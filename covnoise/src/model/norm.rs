//! Batch normalization in PyTorch's semantics, over the whole batch or over
//! consecutive groups of examples (ghost batch normalization), for feature
//! vectors `[B, F]` and images `[B, C, H, W]`.
//!
//! burn's own `BatchNorm` keeps the *biased* batch variance in its running
//! estimate; PyTorch keeps the unbiased one (`n / (n - 1)` times it, n the
//! examples times positions normalized together), and evaluation uses the
//! running estimate. This module follows PyTorch, so a model trained here
//! evaluates as the same model trained in PyTorch would.

use burn::module::{Module, Param, RunningState};
use burn::tensor::{Device, Tensor};

use crate::kernels::{self, NormSink};

/// Batch-norm epsilon and running-average momentum, PyTorch's defaults.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Batch normalization over consecutive groups of `group` examples (0: the
/// whole batch); running statistics keep the unbiased variance, as PyTorch
/// does. Batch statistics on an autodiff device (training), running
/// statistics otherwise (burn's `valid()` model).
#[derive(Module, Debug)]
pub struct GhostBatchNorm {
    /// Scale gamma `[features]`.
    pub gamma: Param<Tensor<1>>,
    /// Shift beta `[features]`.
    pub beta: Param<Tensor<1>>,
    /// Running mean `[features]`.
    pub running_mean: RunningState<Tensor<1>>,
    /// Running (unbiased) variance `[features]`.
    pub running_var: RunningState<Tensor<1>>,
    /// Examples per normalization group; 0 for the whole batch.
    pub group: usize,
}

impl GhostBatchNorm {
    /// Scale 1, shift 0, running mean 0 and variance 1.
    pub fn new(features: usize, group: usize, device: &Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([features], device)),
            beta: Param::from_tensor(Tensor::zeros([features], device)),
            running_mean: RunningState::new(Tensor::zeros([features], device)),
            running_var: RunningState::new(Tensor::ones([features], device)),
            group,
        }
    }

    /// Normalizes features `z` `[B, F]` (see [`GhostBatchNorm::forward_images`]).
    pub fn forward(&self, z: Tensor<2>) -> Tensor<2> {
        let [b, f] = z.dims();
        self.forward_images(z.reshape([b, f, 1, 1])).reshape([b, f])
    }

    /// Normalizes images `z` `[B, C, H, W]` per channel, over the examples of
    /// a group and all positions; with batch statistics (updating the
    /// running ones) on an autodiff device, with the running ones otherwise.
    /// Training on flex runs [`crate::kernels::batch_norm`] (the same
    /// result in two passes each way), elsewhere burn's ops.
    pub fn forward_images(&self, z: Tensor<4>) -> Tensor<4> {
        self.images_with(z, self.gamma.val(), self.beta.val(), None)
            .0
    }

    /// [`GhostBatchNorm::forward_images`] on the fast kernel, whose
    /// backward step leaves the scale's and shift's gradients per
    /// normalization group in `sink`; None (nothing run) where the kernel
    /// does not (then [`GhostBatchNorm::normalized_images`] serves).
    pub(crate) fn forward_images_sunk(&self, z: Tensor<4>, sink: NormSink) -> Option<Tensor<4>> {
        if !z.is_autodiff() {
            return None;
        }
        let b = z.dims()[0];
        let group = if self.group == 0 { b } else { self.group };
        let fast = b.is_multiple_of(group)
            && kernels::batch_norm_applies(&z, &self.gamma.val(), &self.beta.val(), b / group);
        fast.then(|| {
            self.images_with(z, self.gamma.val(), self.beta.val(), Some(sink))
                .0
        })
    }

    /// The normalized images alone, `x̂` (scale 1, shift 0), with the same
    /// statistics and running-statistics update as
    /// [`GhostBatchNorm::forward_images`]; the caller applies the scale and
    /// shift (per example group, for the probes).
    pub(crate) fn normalized_images(&self, z: Tensor<4>) -> Tensor<4> {
        let c = z.dims()[1];
        let device = z.device();
        self.images_with(
            z,
            Tensor::ones([c], &device),
            Tensor::zeros([c], &device),
            None,
        )
        .0
    }

    /// [`GhostBatchNorm::forward_images`] in training mode with a scale and
    /// shift per consecutive group of examples, `gamma` and `beta` `[G,
    /// C]`, each group made of whole normalization groups: on the fast
    /// kernel, each normalization group with its example group's scale and
    /// shift (the same statistics and running update as
    /// [`GhostBatchNorm::forward_images`]). None (nothing run) where the
    /// kernel does not run or the groups split a normalization group.
    pub(crate) fn forward_images_per_group(
        &self,
        z: Tensor<4>,
        gamma: Tensor<2>,
        beta: Tensor<2>,
    ) -> Option<Tensor<4>> {
        let [b, c, _, _] = z.dims();
        let [g, _] = gamma.dims();
        let group = if self.group == 0 { b } else { self.group };
        if !z.is_autodiff() || g == 0 || !b.is_multiple_of(group) {
            return None;
        }
        let norm_groups = b / group;
        if !norm_groups.is_multiple_of(g) {
            return None;
        }
        let k = norm_groups / g;
        let spread = |t: Tensor<2>| {
            t.unsqueeze_dim::<3>(1)
                .expand([g, k, c])
                .reshape([norm_groups * c])
        };
        let (gamma, beta) = (spread(gamma), spread(beta));
        if !kernels::batch_norm_applies(&z, &gamma, &beta, norm_groups) {
            return None;
        }
        Some(self.images_with(z, gamma, beta, None).0)
    }

    /// [`GhostBatchNorm::forward_images`] with scale `gamma` and shift
    /// `beta` `[C]` (or one per normalization group, `[groups C]`, on the
    /// fast kernel only), the fast kernel's backward step filling `sink`;
    /// and whether the fast kernel ran.
    fn images_with(
        &self,
        z: Tensor<4>,
        gamma_c: Tensor<1>,
        beta_c: Tensor<1>,
        sink: Option<NormSink>,
    ) -> (Tensor<4>, bool) {
        let [b, c, h, w] = z.dims();
        let affine = |t: &Tensor<1>| t.clone().reshape([1, c, 1, 1]);
        if !z.is_autodiff() {
            let mean = self.running_mean.value_sync().reshape([1, c, 1, 1]);
            let var = self.running_var.value_sync().reshape([1, c, 1, 1]);
            let normalized = (z - mean) / (var + BN_EPS).sqrt();
            return (normalized * affine(&gamma_c) + affine(&beta_c), false);
        }
        let group = if self.group == 0 { b } else { self.group };
        let n = group * h * w;
        // Models check divisibility when they are configured; this guards
        // direct use of the module.
        assert!(
            b % group == 0 && n >= 2,
            "batch of {b} examples cannot be split into normalization groups of {group}"
        );
        let groups = b / group;
        let unbias = n as f64 / (n as f64 - 1.0);
        if let Some(fast) = kernels::batch_norm_recording(
            z.clone(),
            gamma_c.clone(),
            beta_c.clone(),
            groups,
            BN_EPS,
            sink,
        ) {
            self.update_running(fast.mean.inner(), fast.var.inner() * unbias);
            return (fast.output, true);
        }
        let zr = z.reshape([groups, group, c, h * w]);
        let mean = zr.clone().mean_dim(1).mean_dim(3);
        let centered = zr - mean.clone();
        let var = centered.clone().square().mean_dim(1).mean_dim(3);
        let normalized = centered / (var.clone() + BN_EPS).sqrt();
        let out = normalized.reshape([b, c, h, w]) * affine(&gamma_c) + affine(&beta_c);
        let per_group = |t: Tensor<4>| t.detach().inner().reshape([groups, c]);
        self.update_running(per_group(mean), per_group(var) * unbias);
        (out, false)
    }

    /// Moves the running statistics towards the batch's: `mean` and the
    /// unbiased `var` per group and channel `[groups, C]`, averaged over the
    /// groups.
    fn update_running(&self, mean: Tensor<2>, var: Tensor<2>) {
        let c = self.gamma.dims()[0];
        let batch_mean = mean.mean_dim(0).reshape([c]);
        let batch_var = var.mean_dim(0).reshape([c]);
        let old_mean = self.running_mean.value_sync().inner();
        let old_var = self.running_var.value_sync().inner();
        self.running_mean
            .update(old_mean * (1.0 - BN_MOMENTUM) + batch_mean * BN_MOMENTUM);
        self.running_var
            .update(old_var * (1.0 - BN_MOMENTUM) + batch_var * BN_MOMENTUM);
        // Fold the update in now, so that module visitors (buffer averaging
        // across replicas, records) read the current statistics.
        self.running_mean.value_sync();
        self.running_var.value_sync();
    }
}
