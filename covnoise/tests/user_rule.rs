//! A layer covnoise has no rule for, given one from outside the library, as
//! a user writes it in their own crate: a bilinear layer `y_k = x1ᵀ W_k x2`
//! with its own [`ExactRule`], routed through [`Probes::layer`]. Its exact
//! and Monte-Carlo estimates are checked against single-example backward
//! passes, and its micro-batch gradients from one pass (the driver summing
//! its per-example gradients per micro-batch) against one pass per
//! micro-batch; a deliberately wrong rule for it is refused at validation,
//! naming the layer.

use burn::module::{Module, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor, activation};
use covnoise::CovnoiseError;
use covnoise::collective::SingleProcess;
use covnoise::model::{Batch, Coupling, Examples, Objective, Probes, labels_tensor};
use covnoise::moments::{
    self, Estimator, MicroBatchPasses, MomentKind, PassRequest, SecondMoment, StepContext,
};
use covnoise::noise::{NoiseConfig, NoiseStage};
use covnoise::params::ParamTable;
use covnoise::probes::ExactRule;

mod common;
use common::{flat, norm};

const D: usize = 6;
const P: usize = 4;
const Q: usize = 3;
const CLASSES: usize = 3;

fn device() -> Device {
    Device::flex().autodiff()
}

/// `y_k = x1ᵀ W_k x2` for k < K, with `W` of shape `[K, P, Q]`.
#[derive(Module, Debug)]
struct Bilinear {
    weight: Param<Tensor<3>>,
}

/// What the rule needs: both inputs, without autodiff graph.
#[derive(Debug)]
struct BilinearRule {
    weight: ParamId,
    x1: Tensor<2>,
    x2: Tensor<2>,
    /// A deliberately wrong rule: example i's gradient from x1 and x2 of
    /// the next example (what a rule that mixed up its indexing would give).
    shifted: bool,
}

impl ExactRule for BilinearRule {
    fn layer(&self) -> String {
        "Bilinear".into()
    }

    fn params(&self) -> Vec<ParamId> {
        vec![self.weight]
    }

    /// Example i: `dW_k = δ_ik x1_i x2_iᵀ`, `[len, K * P * Q]`.
    fn per_example(
        &self,
        _index: usize,
        output_grad: &Tensor<2>,
        start: usize,
        len: usize,
    ) -> covnoise::Result<Tensor<2>> {
        let b = self.x1.dims()[0];
        let (x1, x2) = if self.shifted {
            let roll = |x: &Tensor<2>| {
                Tensor::cat(
                    vec![x.clone().narrow(0, 1, b - 1), x.clone().narrow(0, 0, 1)],
                    0,
                )
            };
            (roll(&self.x1), roll(&self.x2))
        } else {
            (self.x1.clone(), self.x2.clone())
        };
        let outer = x1
            .narrow(0, start, len)
            .reshape([len, 1, P, 1])
            .matmul(x2.narrow(0, start, len).reshape([len, 1, 1, Q]));
        let delta = output_grad
            .clone()
            .narrow(0, start, len)
            .reshape([len, CLASSES, 1, 1]);
        Ok((outer * delta).reshape([len, CLASSES * P * Q]))
    }
}

impl Bilinear {
    fn forward(
        &self,
        x1: Tensor<2>,
        x2: Tensor<2>,
        probes: &mut Probes,
        shifted: bool,
    ) -> Tensor<2> {
        let [b, _] = x1.dims();
        // [b, 1, 1, P] x [1, K, P, Q] -> [b, K, 1, Q], then times x2.
        let left = x1
            .clone()
            .reshape([b, 1, 1, P])
            .matmul(self.weight.val().reshape([1, CLASSES, P, Q]));
        let y = (left * x2.clone().reshape([b, 1, 1, Q]))
            .sum_dim(3)
            .reshape([b, CLASSES]);
        probes.layer(y, || BilinearRule {
            weight: self.weight.id,
            x1: x1.detach().inner(),
            x2: x2.detach().inner(),
            shifted,
        })
    }
}

/// Two Linear branches (ReLU and identity) feeding the bilinear layer.
#[derive(Module, Debug)]
struct Net {
    left: Linear,
    right: Linear,
    bilinear: Bilinear,
}

impl Net {
    fn new(seed: u64) -> Self {
        let d = device();
        d.seed(seed);
        Net {
            left: LinearConfig::new(D, P).init(&d),
            right: LinearConfig::new(D, Q).init(&d),
            bilinear: Bilinear {
                weight: Param::from_tensor(Tensor::random(
                    [CLASSES, P, Q],
                    Distribution::Normal(0.0, 0.5),
                    &d,
                )),
            },
        }
    }

    fn logits(&self, x: Tensor<2>, p: &mut Probes, shifted: bool) -> Tensor<2> {
        let x1 = activation::relu(p.linear(&self.left, x.clone()));
        let x2 = p.linear(&self.right, x);
        self.bilinear.forward(x1, x2, p, shifted)
    }
}

fn data(n: usize, seed: u64) -> Batch {
    let d = device();
    d.seed(seed);
    let x = Tensor::<2>::random([n, D], Distribution::Normal(0.0, 1.0), &d);
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % CLASSES) as u8).collect();
    Batch {
        x,
        labels: labels_tensor(&labels, &d),
    }
}

fn right(m: &Net, b: &Batch, p: &mut Probes) -> Objective {
    Objective::Classification {
        logits: m.logits(b.x.clone(), p, false),
        labels: b.labels.clone(),
    }
}

fn wrong(m: &Net, b: &Batch, p: &mut Probes) -> Objective {
    Objective::Classification {
        logits: m.logits(b.x.clone(), p, true),
        labels: b.labels.clone(),
    }
}

fn ctx(table: &ParamTable, step: u64) -> StepContext<'_> {
    StepContext {
        seed: 5,
        step,
        collective: &SingleProcess,
        table,
        coupling: Coupling::Independent,
        chunk: None,
    }
}

/// `(1/n) Σ_i g_i²` from single-example backward passes, each against
/// `labels` (the data's own when None).
fn brute_force_diag(model: &Net, batch: &Batch, labels: Option<&[u8]>) -> Vec<f64> {
    let table = ParamTable::of(model);
    let n = batch.len();
    let mut sums: Vec<f64> = Vec::new();
    for i in 0..n {
        let one = batch.slice(i, 1);
        let request = PassRequest {
            labels: labels.map(|l| labels_tensor(&l[i..i + 1], &batch.x.device())),
            ..Default::default()
        };
        let g = flat(
            &moments::backward_pass(model, &table, &one, &right, request)
                .unwrap()
                .grads,
        );
        if sums.is_empty() {
            sums = vec![0.0; g.len()];
        }
        for (s, v) in sums.iter_mut().zip(&g) {
            *s += v * v / n as f64;
        }
    }
    sums
}

/// Every parameter's estimate against the reference, at most 1e-4
/// relative: float32 sums over a dozen examples err by about 1e-6, and a
/// rule that mixed examples or squared per output is off by tens of
/// percent.
fn assert_per_parameter(
    table: &ParamTable,
    estimate: &SecondMoment,
    reference: &[f64],
    label: &str,
) {
    let SecondMoment::Diag(est) = estimate else {
        panic!("diagonal requested")
    };
    let mut start = 0;
    for (e, t) in table.entries().iter().zip(est) {
        let r = &reference[start..start + e.numel()];
        let got = flat(std::slice::from_ref(t));
        let diff: Vec<f64> = got.iter().zip(r).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(r);
        assert!(rel <= 1e-4, "{label}, {}: relative error {rel}", e.name);
        start += e.numel();
    }
    assert_eq!(start, reference.len());
}

#[test]
fn a_user_rule_gives_exact_and_monte_carlo_estimates_equal_to_single_example_passes() {
    let model = Net::new(1);
    let batch = data(12, 2);
    let table = ParamTable::of(&model);
    assert_eq!(
        table.len(),
        5,
        "left and right weight and bias, bilinear weight"
    );
    // The stage's own validation accepts the rule.
    NoiseStage::new(NoiseConfig::diag_fisher(4), 12, 0)
        .unwrap()
        .validate_model(&model, &batch, right)
        .unwrap();

    let exact = moments::estimate(
        &model,
        &batch,
        &right,
        Estimator::Exact,
        MomentKind::Diag,
        &ctx(&table, 0),
    )
    .unwrap()
    .moment
    .unwrap();
    assert_per_parameter(
        &table,
        &exact,
        &brute_force_diag(&model, &batch, None),
        "exact",
    );

    for step in [0, 7] {
        let mc = moments::estimate(
            &model,
            &batch,
            &right,
            Estimator::McFisher,
            MomentKind::Diag,
            &ctx(&table, step),
        )
        .unwrap()
        .moment
        .unwrap();
        let logits = model
            .logits(batch.x.clone(), &mut Probes::off(), false)
            .detach()
            .inner();
        let labels = moments::mc_fisher_labels(&logits, 5, step, 0).unwrap();
        let reference = brute_force_diag(&model, &batch, Some(&labels));
        assert_per_parameter(&table, &mc, &reference, &format!("mc-fisher, step {step}"));
    }
}

/// The micro-batch estimator from one pass (the user rule offers no
/// `group_sums`, so the driver sums its `per_example` rows per micro-batch)
/// equals the estimator with one pass per micro-batch, to float32 rounding
/// (1e-4 relative; a row summed into the wrong micro-batch is off by O(1)).
#[test]
fn a_user_rule_gives_micro_batch_gradients_from_one_pass() {
    let model = Net::new(3);
    let batch = data(12, 4);
    let table = ParamTable::of(&model);
    let run = |passes: MicroBatchPasses| {
        let out = moments::estimate_with(
            &model,
            &batch,
            &right,
            Estimator::microbatch(3),
            MomentKind::Diag,
            passes,
            &ctx(&table, 0),
        )
        .unwrap();
        let Some(SecondMoment::Diag(d)) = out.moment else {
            panic!("a diagonal")
        };
        (flat(&out.grads), flat(&d))
    };
    let ((g1, m1), (g2, m2)) = (
        run(MicroBatchPasses::OneThroughRules),
        run(MicroBatchPasses::PerMicroBatch),
    );
    let rel = |a: &[f64], b: &[f64]| {
        let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        norm(&diff) / norm(b)
    };
    assert!(
        rel(&g1, &g2) <= 1e-4,
        "step gradients differ by {}",
        rel(&g1, &g2)
    );
    assert!(rel(&m1, &m2) <= 1e-4, "moments differ by {}", rel(&m1, &m2));
}

#[test]
fn a_wrong_user_rule_is_refused_at_validation_naming_the_layer() {
    let model = Net::new(3);
    let batch = data(8, 4);
    for estimator in [Estimator::Exact, Estimator::McFisher] {
        let config = NoiseConfig::diag_fisher(4).with_estimator(estimator);
        let err = NoiseStage::new(config, 8, 0)
            .unwrap()
            .validate_model(&model, &batch, wrong)
            .unwrap_err();
        assert!(
            matches!(&err, CovnoiseError::Refused { problem: m, .. } if m.contains("Bilinear") && m.contains("bilinear.weight")),
            "{err}"
        );
    }
    // The micro-batch estimator uses no rule, so the same model is accepted.
    let micro = NoiseConfig::diag_fisher(4).with_estimator(Estimator::microbatch(2));
    NoiseStage::new(micro, 8, 0)
        .unwrap()
        .validate_model(&model, &batch, wrong)
        .unwrap();
}

fn right_unprobed(m: &Net, b: &Batch, _: &mut Probes) -> Objective {
    right(m, b, &mut Probes::off())
}

/// The user's layer computes its output itself, so it cannot run each
/// micro-batch at parameters of its own: a pass at shifted parameters
/// through it is refused, naming the layer, instead of silently running
/// that layer at theta. The penalties then keep one pass per micro-batch
/// at the moved parameters (their micro-batch gradients at theta still
/// come from one pass through the rules), and give the step that one pass
/// per micro-batch for everything gives, to float32 rounding (1e-4
/// relative: the forward differences divide rounding of about 1e-7 by
/// r = 1e-2). Had the stage run the shifted pass, the step would fail.
#[test]
fn a_user_layer_refuses_shifted_passes_and_penalties_keep_their_moved_passes() {
    use covnoise::probes::GroupShifts;
    use covnoise::regularizer::Regularizer;
    let model = Net::new(5);
    let batch = data(12, 6);
    let table = ParamTable::of(&model);
    let host = Device::flex();
    let rows = table
        .entries()
        .iter()
        .map(|e| Tensor::<2>::random([3, e.numel()], Distribution::Normal(0.0, 0.1), &host))
        .collect();
    let request = PassRequest {
        shifts: Some(GroupShifts::from_table(&table, 4, rows).unwrap()),
        ..Default::default()
    };
    let err = moments::backward_pass(&model, &table, &batch, &right, request).unwrap_err();
    assert!(err.to_string().contains("Bilinear"), "{err}");
    let step = |probed: bool| {
        let mut stage = NoiseStage::new(NoiseConfig::none(), 12, 4)
            .unwrap()
            .with_regularizer(Regularizer::grad_norm(0.5, 3))
            .unwrap();
        let mut g = if probed {
            stage.gradient(&model, &batch, right).unwrap()
        } else {
            stage.gradient(&model, &batch, right_unprobed).unwrap()
        };
        flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap())
    };
    let (a, b) = (step(true), step(false));
    let rel = common::rel_distance(&a, &b);
    assert!(rel <= 1e-4, "steps differ by {rel}");
}
