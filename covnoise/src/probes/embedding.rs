//! The exact rule of burn's `Embedding` on tokens `[B, T]`: row v of
//! example i's table gradient is the sum of `δ_it` over the positions t
//! where the example holds token v (repeated tokens add up before the
//! square).

use burn::module::ParamId;
use burn::nn::Embedding;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use super::Probes;
use super::rule::ExactRule;
use crate::error::Result;

/// What a probed `Embedding` records: the token ids and the table's rows.
#[derive(Debug, Clone)]
pub struct EmbeddingRule {
    /// The table `[vocabulary, d]`.
    pub weight: ParamId,
    /// Token ids `[B, T]`.
    pub tokens: Tensor<2, Int>,
    /// Rows of the table.
    pub vocabulary: usize,
}

impl ExactRule for EmbeddingRule {
    fn layer(&self) -> String {
        "Embedding".into()
    }

    fn params(&self) -> Vec<ParamId> {
        vec![self.weight]
    }

    /// Each position's output gradient is added into the row of its token,
    /// in a buffer of one table per example.
    fn per_example(
        &self,
        _index: usize,
        output_grad: &Tensor<2>,
        start: usize,
        len: usize,
    ) -> Result<Tensor<2>> {
        let t = self.tokens.dims()[1];
        let d = output_grad.dims()[1] / t.max(1);
        let v = self.vocabulary;
        let device = output_grad.device();
        let offsets = Tensor::<1, Int>::arange(0..len as i64, &device)
            .reshape([len, 1])
            .mul_scalar(v as i64);
        let keys = (self.tokens.clone().narrow(0, start, len) + offsets).reshape([len * t]);
        let values = output_grad
            .clone()
            .narrow(0, start, len)
            .reshape([len * t, d]);
        Ok(Tensor::<2>::zeros([len * v, d], &device)
            .select_assign(0, keys, values, IndexingUpdateOp::Add)
            .reshape([len, v * d]))
    }

    fn bytes_per_example(&self, _index: usize, numel: usize) -> usize {
        let t = self.tokens.dims()[1];
        let d = numel / self.vocabulary.max(1);
        4 * (numel + t * d).max(1)
    }
}

impl Probes {
    /// `layer.forward(tokens)` for token ids `[B, T]`, recording the layer
    /// when the probes are on.
    pub fn embedding(&mut self, layer: &Embedding, tokens: Tensor<2, Int>) -> Tensor<3> {
        if self.is_off() {
            return layer.forward(tokens);
        }
        if let Some(shifts) = self.group_shifts() {
            return shifts.embedding(layer, tokens);
        }
        let [vocabulary, _] = layer.weight.dims();
        let recorded = tokens.clone();
        let z = layer.forward(tokens);
        self.layer_with(
            z,
            || EmbeddingRule {
                weight: layer.weight.id,
                tokens: recorded.inner(),
                vocabulary,
            },
            true,
        )
    }
}
