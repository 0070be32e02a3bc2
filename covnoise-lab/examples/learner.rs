//! A burn-train `Learner` user's model with covnoise's diagonal-Fisher noise:
//! `TrainStep::step` asks the shared noise stage for the step's gradient, and
//! the Learner's optimizer applies it as usual.
//!
//! cargo run --release --example learner -- [EPOCHS] [TRAIN_EXAMPLES]
//! (defaults: 3 epochs on all 60,000 examples; the data from Debian's
//! dataset-fashion-mnist or $COVNOISE_DATA).

use std::sync::Arc;

use burn::data::dataloader::{DataLoaderBuilder, batcher::Batcher};
use burn::data::dataset::{Dataset, DatasetError};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::SgdConfig;
use burn::optim::momentum::MomentumConfig;
use burn::tensor::{Device, Tensor, activation};
use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{AccuracyMetric, LossMetric, MetricDefinition, MetricId};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};
use burn::train::{
    ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep,
};
use covnoise::model::{Batch, Objective, Probes};
use covnoise::noise::{NoiseConfig, NoiseStage, SharedNoiseStage};
use covnoise_lab::data::{self, DatasetKind, LoadOptions};
use covnoise_lab::train::features_to_device;

#[derive(Module, Debug)]
struct Net {
    hidden: Linear,
    out: Linear,
    /// Shared by the Learner's clones of the model; not a parameter.
    #[module(skip)]
    noise: SharedNoiseStage,
}

impl Net {
    fn logits(&self, x: Tensor<2>, probes: &mut Probes) -> Tensor<2> {
        let h = activation::relu(probes.linear(&self.hidden, x));
        probes.linear(&self.out, h)
    }

    fn objective(&self, batch: &Batch, probes: &mut Probes) -> Objective {
        let (logits, labels) = (self.logits(batch.x.clone(), probes), batch.labels.clone());
        Objective::Classification { logits, labels }
    }

    fn output(&self, batch: Batch) -> ClassificationOutput {
        let logits = self.logits(batch.x, &mut Probes::off());
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.clone(), batch.labels.clone());
        ClassificationOutput::new(loss, logits, batch.labels)
    }
}

impl TrainStep for Net {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        let step = self.noise.gradient(self, &batch, Net::objective);
        let step = step.unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1)
        });
        // The metrics' view of the batch: one extra forward pass, no graph.
        let (x, labels) = (batch.x.inner(), batch.labels.inner());
        let metrics = self.valid().output(Batch { x, labels });
        TrainOutput {
            grads: step.grads,
            item: metrics,
        }
    }
}

impl InferenceStep for Net {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.output(batch)
    }
}

/// One line per epoch and split ("epoch 2/3 train: Loss 0.512, Accuracy
/// 81.9"), instead of burn-train's line per batch: the last values the
/// metrics reported in the split (running means over the epoch).
#[derive(Default)]
struct EpochLines {
    names: Vec<(MetricId, String)>,
    latest: Vec<(MetricId, String)>,
    split: String,
    epoch: usize,
    epochs: usize,
}

impl EpochLines {
    fn record(&mut self, state: MetricState) {
        let entry = match state {
            MetricState::Generic(e) | MetricState::Numeric(e, _) => e,
        };
        let text = entry.serialized_entry.formatted;
        match self
            .latest
            .iter_mut()
            .find(|(id, _)| *id == entry.metric_id)
        {
            Some(slot) => slot.1 = text,
            None => self.latest.push((entry.metric_id, text)),
        }
    }
}

impl MetricsRendererTraining for EpochLines {
    fn update_train(&mut self, state: MetricState) {
        self.record(state);
    }
    fn update_valid(&mut self, state: MetricState) {
        self.record(state);
    }
}

impl TrainingProgressLogger for EpochLines {
    fn start(&mut self, epochs: usize, starting: usize, _: Option<usize>, _: Option<&str>) {
        (self.epochs, self.epoch) = (epochs, starting);
    }
    fn update_epoch(&mut self, epoch: usize) {
        self.epoch = epoch;
    }
    fn start_split(&mut self, split: &str, _: usize) {
        self.split = split.to_string();
        self.latest.clear();
    }
    fn update_split(&mut self, _: usize) {}
    fn end_split(&mut self) {
        let values: Vec<String> = self
            .latest
            .iter()
            .map(|(id, text)| {
                let name = self.names.iter().find(|(n, _)| n == id);
                format!("{} {text}", name.map_or("?", |(_, n)| n.as_str()))
            })
            .collect();
        let epoch = (self.epoch + 1).min(self.epochs);
        println!(
            "epoch {epoch}/{} {}: {}",
            self.epochs,
            self.split,
            values.join(", ")
        );
    }
    fn end(&mut self) {}
    fn log_event_training(&mut self, _: String) {}
}

impl EvaluationProgressLogger for EpochLines {
    fn start_global_progress(&mut self, _: usize) {}
    fn start_test(&mut self, _: &str, _: usize) {}
    fn update_test_progress(&mut self, _: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _: String) {}
}

impl MetricsRendererEvaluation for EpochLines {
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}
}

impl MetricsRenderer for EpochLines {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .push((definition.metric_id, definition.name.to_string()));
    }
}

/// The examples of a split, by index; the batcher gathers them.
struct Indices(usize);

impl Dataset<usize> for Indices {
    fn get(&self, index: usize) -> Result<usize, DatasetError> {
        Ok(index)
    }
    fn len(&self) -> usize {
        self.0
    }
}

struct Gather(Arc<data::Dataset>);

impl Batcher<usize, Batch> for Gather {
    fn batch(&self, indices: Vec<usize>, device: &Device) -> Batch {
        features_to_device(&self.0.gather(&indices), device)
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
    let (train, test) = (Arc::new(data.train), Arc::new(data.test));
    let (batch_size, lr) = (1024.min(train.len()), 0.1);
    // The stage needs full batches: the tail that does not fill one is left out.
    let steps_per_epoch = train.len() / batch_size;
    let loader = |split: &Arc<data::Dataset>, n, seed| {
        let builder = DataLoaderBuilder::new(Gather(split.clone())).batch_size(batch_size);
        builder.shuffle(seed).build(Indices(n))
    };
    let train_loader = loader(&train, steps_per_epoch * batch_size, 0);
    let test_loader = loader(&test, test.len(), 1);

    let device = Device::flex().autodiff();
    device.seed(0);
    // Noise with the diagonal Fisher's structure, as if the batch were 64.
    let stage = NoiseStage::new(NoiseConfig::diag_fisher(64), batch_size, 0)?;
    let net = Net {
        hidden: LinearConfig::new(784, 256).init(&device),
        out: LinearConfig::new(256, 10).init(&device),
        noise: SharedNoiseStage::new(stage, steps_per_epoch)?,
    };
    // burn's SGD with PyTorch's momentum: dampening 0 (burn's default is 0.1).
    let momentum = MomentumConfig::new().with_momentum(0.9).with_dampening(0.0);
    let optimizer = SgdConfig::new().with_momentum(Some(momentum)).init();
    let dir = std::env::temp_dir().join("covnoise-learner-example");
    let result = SupervisedTraining::new(&dir, train_loader, test_loader)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .renderer(Box::new(EpochLines::default()))
        .num_epochs(epochs)
        .launch(Learner::new(net, optimizer, lr));

    let (model, examples) = (result.model, test.len());
    let all: Vec<usize> = (0..examples).collect();
    let output = model.output(features_to_device(&test.gather(&all), &Device::flex()));
    let predicted = output.output.argmax(1).squeeze_dim::<1>(1);
    let correct: i64 = predicted
        .equal(output.targets)
        .int()
        .sum()
        .into_scalar::<i64>();
    println!("test accuracy {:.4}", correct as f64 / examples as f64);
    Ok(())
}
