//! A token model, as a transformer user writes one, trained with burn's SGD
//! plus covnoise's exact diagonal-Fisher noise.
//!
//! The task is synthetic (no download): each sequence of 16 tokens carries
//! one of 4 classes as its most frequent "marker" token. Tokens 0-3 are the
//! markers, 4-31 filler; a position holds the class's marker with
//! probability 0.25, a random marker with 0.15, filler otherwise. The model
//! is Embedding -> LayerNorm -> a per-token MLP with a residual -> mean over
//! positions -> Linear. Every layer goes through `Probes`, so the exact
//! estimator sums each example's gradients over its positions before
//! squaring (see docs/method.md, section 4).
//!
//! cargo run --release --example sequence -- [EPOCHS] [TRAIN_EXAMPLES]
//! (defaults: 10 epochs on 8,192 sequences; 2,048 test sequences).

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::SgdConfig;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use covnoise::model::{Examples, Objective, Probes, cross_entropy_and_correct};
use covnoise::noise::{NoiseConfig, NoiseStage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const LENGTH: usize = 16;
const VOCABULARY: usize = 32;
const MARKERS: usize = 4;
const WIDTH: usize = 32;

/// Token ids `[B, T]` and a class per sequence: the batch type is the
/// user's own; the noise stage only needs its size and slices.
#[derive(Debug, Clone)]
struct Sequences {
    tokens: Tensor<2, Int>,
    labels: Tensor<1, Int>,
}

impl Examples for Sequences {
    fn len(&self) -> usize {
        self.labels.dims()[0]
    }

    fn slice(&self, start: usize, len: usize) -> Self {
        Self {
            tokens: self.tokens.clone().narrow(0, start, len),
            labels: self.labels.clone().narrow(0, start, len),
        }
    }
}

/// `n` sequences of the marker task, seeded.
fn sequences(n: usize, seed: u64, device: &Device) -> Sequences {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tokens = Vec::with_capacity(n * LENGTH);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let class = rng.random_range(0..MARKERS);
        labels.push(class as i64);
        for _ in 0..LENGTH {
            let u: f64 = rng.random();
            let token = if u < 0.25 {
                class
            } else if u < 0.40 {
                rng.random_range(0..MARKERS)
            } else {
                rng.random_range(MARKERS..VOCABULARY)
            };
            tokens.push(token as i64);
        }
    }
    Sequences {
        tokens: Tensor::from_data(TensorData::new(tokens, [n, LENGTH]), device),
        labels: Tensor::from_data(TensorData::new(labels, [n]), device),
    }
}

#[derive(Module, Debug)]
struct TokenClassifier {
    embed: Embedding,
    norm: LayerNorm,
    up: Linear,
    down: Linear,
    head: Linear,
}

impl TokenClassifier {
    fn new(device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(VOCABULARY, WIDTH).init(device),
            norm: LayerNormConfig::new(WIDTH).init(device),
            up: LinearConfig::new(WIDTH, 2 * WIDTH).init(device),
            down: LinearConfig::new(2 * WIDTH, WIDTH).init(device),
            head: LinearConfig::new(WIDTH, MARKERS).init(device),
        }
    }

    /// Logits `[B, classes]`. `probes.linear` on `[B, T, width]` applies the
    /// layer to every token; the example stays the first dimension.
    fn logits(&self, tokens: Tensor<2, Int>, probes: &mut Probes) -> Tensor<2> {
        let e = probes.embedding(&self.embed, tokens);
        let h = probes.layer_norm(&self.norm, e);
        let up = activation::gelu(probes.linear(&self.up, h.clone()));
        let mlp = probes.linear(&self.down, up);
        let [b, _, w] = mlp.dims();
        let pooled = (h + mlp).mean_dim(1).reshape([b, w]);
        probes.linear(&self.head, pooled)
    }

    fn forward(&self, batch: &Sequences, probes: &mut Probes) -> Objective {
        Objective::Classification {
            logits: self.logits(batch.tokens.clone(), probes),
            labels: batch.labels.clone(),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i, default| std::env::args().nth(i).map_or(Ok(default), |a| a.parse());
    let (epochs, train_size): (usize, usize) = (arg(1, 10)?, arg(2, 8192)?);
    let device = Device::flex().autodiff();
    device.seed(0);
    let train = sequences(train_size, 1, &device);
    let test = sequences(2048, 2, &Device::flex());
    let mut model = TokenClassifier::new(&device);
    let momentum = MomentumConfig::new().with_momentum(0.9).with_dampening(0.0);
    let mut optimizer = SgdConfig::new().with_momentum(Some(momentum)).init();
    let (batch_size, lr) = (512.min(train_size), 0.05);
    // Exact diagonal-Fisher noise as if the batch were 32: c = 1/32 - 1/512.
    let mut noise = NoiseStage::new(NoiseConfig::diag_fisher(32), batch_size, 0)?;
    // A dry run refuses, by name, any parameter the exact rules cannot
    // cover, before training starts.
    noise.validate_model(
        &model,
        &train.slice(0, batch_size),
        TokenClassifier::forward,
    )?;
    let steps = train_size / batch_size;
    println!(
        "{} parameters, batch {batch_size}, lr {lr}, noise scale c = {:.5}",
        model.num_params(),
        noise.scale()
    );
    for epoch in 0..epochs {
        let (mut loss, mut noise_variance) = (0.0, 0.0);
        for step in 0..steps {
            let batch = train.slice(step * batch_size, batch_size);
            let g = noise.gradient(&model, &batch, TokenClassifier::forward)?;
            loss += g.loss / steps as f64;
            noise_variance += g.noise_trace.unwrap_or(0.0) / steps as f64;
            model = optimizer.step(lr, model, g.grads);
        }
        let logits = model
            .valid()
            .logits(test.tokens.clone(), &mut Probes::off());
        let (test_loss, correct) = cross_entropy_and_correct(&logits, &test.labels)?;
        println!(
            "epoch {:>2}: train loss {loss:.4}  test loss {test_loss:.4}  test accuracy {:.1} %  noise variance c tr(S) {noise_variance:.4}",
            epoch + 1,
            100.0 * correct as f64 / test.len() as f64
        );
    }
    Ok(())
}
