//! A burn user's own model, trained on Fashion-MNIST with burn's SGD plus
//! covnoise's diagonal-Fisher noise, then evaluated on the test set.
//!
//! cargo run --release --example burn_user -- [EPOCHS] [TRAIN_EXAMPLES]
//! (defaults: 3 epochs on all 60,000 examples; the data from Debian's
//! dataset-fashion-mnist or $COVNOISE_DATA).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::SgdConfig;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::{Device, Tensor, activation};
use covnoise::model::{Batch, Objective, Probes, cross_entropy_and_correct};
use covnoise::noise::{NoiseConfig, NoiseStage};
use covnoise_lab::data::{DatasetKind, LoadOptions};
use covnoise_lab::train::features_to_device;

#[derive(Module, Debug)]
struct Net {
    hidden: Linear,
    out: Linear,
}

impl Net {
    /// Probe-aware layers: `probes.linear` is `layer.forward` unless the
    /// exact estimator asks for per-example factors.
    fn logits(&self, x: Tensor<2>, probes: &mut Probes) -> Tensor<2> {
        let h = activation::relu(probes.linear(&self.hidden, x));
        probes.linear(&self.out, h)
    }

    fn forward(&self, batch: &Batch, probes: &mut Probes) -> Objective {
        let (logits, labels) = (self.logits(batch.x.clone(), probes), batch.labels.clone());
        Objective::Classification { logits, labels }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i, default| std::env::args().nth(i).map_or(Ok(default), |a| a.parse());
    let (epochs, train_limit) = (arg(1, 3)?, arg(2, 60_000)?);
    let options = LoadOptions {
        train_limit: Some(train_limit),
        ..LoadOptions::default()
    };
    let data = DatasetKind::FashionMnist.load(None, &options)?;
    let device = Device::flex().autodiff();
    device.seed(0);
    let mut net = Net {
        hidden: LinearConfig::new(784, 256).init(&device),
        out: LinearConfig::new(256, 10).init(&device),
    };
    // burn's SGD with PyTorch's momentum: dampening 0 (burn's default is 0.1).
    let momentum = MomentumConfig::new().with_momentum(0.9).with_dampening(0.0);
    let mut optimizer = SgdConfig::new().with_momentum(Some(momentum)).init();
    let (batch_size, lr) = (1024.min(train_limit), 0.1);
    // Noise with the diagonal Fisher's structure, as if the batch were 64.
    let mut noise = NoiseStage::new(NoiseConfig::diag_fisher(64), batch_size, 0)?;
    for epoch in 0..epochs {
        for indices in data.train.batches(batch_size, 0, epoch as u64).iter() {
            let batch = features_to_device(&data.train.gather(indices), &device);
            let step = noise.gradient(&net, &batch, Net::forward)?;
            net = optimizer.step(lr, net, step.grads);
        }
    }
    let all: Vec<usize> = (0..data.test.len()).collect();
    let test = features_to_device(&data.test.gather(&all), &Device::flex());
    let logits = net.valid().logits(test.x, &mut Probes::off());
    let (loss, correct) = cross_entropy_and_correct(&logits, &test.labels)?;
    let accuracy = correct as f64 / all.len() as f64;
    println!("test accuracy {accuracy:.4}  test loss {loss:.4}");
    Ok(())
}
