//! Batch normalization through the probes: no per-example rule (its
//! examples are not independent), but it tells the noise stage which
//! examples normalize together, so that micro-batches and chunks keep its
//! groups whole (see [`crate::model::Coupling`]).

use burn::tensor::Tensor;

use super::{Mode, NormGroups, Probes};
use crate::model::GhostBatchNorm;

impl Probes {
    /// `layer` applied to `x` `[B, C, ...]` (features `[B, F]` or images
    /// `[B, C, H, W]`), recording how it groups examples.
    pub fn batch_norm<const D: usize>(
        &mut self,
        layer: &GhostBatchNorm,
        x: Tensor<D>,
    ) -> Tensor<D> {
        let params = [layer.gamma.id, layer.beta.id];
        match self.mode {
            Mode::Off => {}
            // It normalizes and scales in one op: it cannot run groups of
            // examples at parameters of their own.
            Mode::Shifted => self.note_unshifted(|| "BatchNorm".into(), &params),
            Mode::Observe | Mode::On => {
                if self.mode == Mode::Observe {
                    self.unmovable.extend(params);
                }
                self.norms.push(NormGroups {
                    gamma: layer.gamma.id,
                    group: layer.group,
                });
            }
        }
        let dims = x.dims();
        let rest: usize = dims[2..].iter().product();
        layer
            .forward_images(x.reshape([dims[0], dims[1], rest, 1]))
            .reshape(dims)
    }
}
