//! The noise forms of peer work (Wu et al., ICML 2020; Zhu et al., ICML
//! 2019) as noise structures: Bernoulli multiplicative weights, Gaussian
//! weights on a random subset of examples, and isotropic noise of a
//! constant variance. Each is checked against its definition: the
//! covariance of the added noise by Monte Carlo against the closed form
//! (c F_B from single-example gradients, or c v I), and zero scale against
//! the plain step, bit for bit.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use covnoise::model::{Batch, Objective, Probes, labels_tensor};
use covnoise::moments::{self, PassRequest};
use covnoise::noise::{
    Bernoulli, Constant, NoiseConfig, NoiseStage, NoiseStructure, ScaleRule, StructureName,
    StructureOptions, Subset,
};
use covnoise::params::ParamTable;

mod common;
use common::{flat, per_example};

const B: usize = 8;

fn device() -> Device {
    Device::flex().autodiff()
}

#[derive(Module, Debug)]
struct Net {
    fc: Linear,
}

fn forward(m: &Net, b: &Batch, p: &mut Probes) -> Objective {
    Objective::Classification {
        logits: p.linear(&m.fc, b.x.clone()),
        labels: b.labels.clone(),
    }
}

/// A 3-to-2 softmax classifier (8 parameters) and 8 examples.
fn setup() -> (Net, Batch) {
    let d = device();
    d.seed(3);
    let net = Net {
        fc: LinearConfig::new(3, 2).init(&d),
    };
    let x: Vec<f32> = (0..B * 3)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 6.0)
        .collect();
    let labels: Vec<u8> = (0..B).map(|i| (i % 2) as u8).collect();
    let data = Batch {
        x: Tensor::from_data(TensorData::new(x, [B, 3]), &d),
        labels: labels_tensor(&labels, &d),
    };
    (net, data)
}

fn stage(structure: Arc<dyn NoiseStructure>, c: f64, seed: u64) -> NoiseStage {
    let config = NoiseConfig {
        scale: ScaleRule::Fixed { c },
        ..NoiseConfig::none().with_structure(structure)
    };
    NoiseStage::new(config, B, seed).unwrap()
}

fn plain(net: &Net, data: &Batch) -> Vec<f64> {
    let table = ParamTable::of(net);
    flat(
        &moments::backward_pass(net, &table, data, &forward, PassRequest::default())
            .unwrap()
            .grads,
    )
}

/// `draws` noise vectors (noisy minus plain gradient) from `stage`.
fn draws(stage: &mut NoiseStage, net: &Net, data: &Batch, n: usize) -> Vec<Vec<f64>> {
    let table = ParamTable::of(net);
    let reference = plain(net, data);
    (0..n)
        .map(|_| {
            let mut g = stage.gradient(net, data, forward).unwrap();
            flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap())
                .iter()
                .zip(&reference)
                .map(|(a, b)| a - b)
                .collect()
        })
        .collect()
}

/// The empirical second moment of `draws` against `expected` (d x d,
/// row-major). The noises are not Gaussian (Bernoulli weights are 0 or
/// 1/p), so each entry's standard error comes from the draws themselves:
/// the sample deviation of `x_i x_j` over sqrt(N). The Frobenius error must
/// be within 4 times the root sum of squared standard errors (a chi-like
/// sum over d² entries: a correct estimate exceeds it essentially never),
/// and that bound must be below `max_fraction` of ‖expected‖, so that a
/// wrong scale of that size is seen.
fn assert_second_moment(draws: &[Vec<f64>], expected: &[f64], max_fraction: f64, label: &str) {
    let n = draws.len() as f64;
    let d = draws[0].len();
    let (mut err2, mut se2, mut norm2) = (0.0, 0.0, 0.0);
    for i in 0..d {
        for j in 0..d {
            let products: Vec<f64> = draws.iter().map(|v| v[i] * v[j]).collect();
            let mean = products.iter().sum::<f64>() / n;
            let var = products.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let c = expected[i * d + j];
            err2 += (mean - c).powi(2);
            se2 += var / n;
            norm2 += c * c;
        }
    }
    let (err, tol, norm) = (err2.sqrt(), 4.0 * se2.sqrt(), norm2.sqrt());
    assert!(
        err <= tol,
        "{label}: error {err} > tolerance {tol} (|C| = {norm})"
    );
    assert!(
        tol < max_fraction * norm,
        "{label}: test too weak: tolerance {tol}, |C| {norm}"
    );
}

/// c F_B = (c/B) Σ_i g_i g_iᵀ from single-example passes.
fn c_fisher(net: &Net, data: &Batch, c: f64) -> Vec<f64> {
    let per = per_example(net, data, &forward);
    let d = per[0].len();
    let mut f = vec![0.0; d * d];
    for g in &per {
        for i in 0..d {
            for j in 0..d {
                f[i * d + j] += c * g[i] * g[j] / B as f64;
            }
        }
    }
    f
}

#[test]
fn bernoulli_and_subset_noise_have_covariance_c_fisher() {
    let (net, data) = setup();
    // The paper rule's c for imitating batch 2 with batch 8.
    let c = 1.0 / 2.0 - 1.0 / B as f64;
    let expected = c_fisher(&net, &data, c);
    let cases: [(Arc<dyn NoiseStructure>, &str); 3] = [
        (Arc::new(Bernoulli), "bernoulli"),
        (Arc::new(Subset { size: 3 }), "subset of 3"),
        (Arc::new(Subset { size: B }), "subset of all"),
    ];
    for (structure, label) in cases {
        let mut s = stage(structure, c, 5);
        let d = draws(&mut s, &net, &data, 20_000);
        assert_second_moment(&d, &expected, 0.15, label);
        // The noise has mean zero: the step stays unbiased.
        let dim = d[0].len();
        for k in 0..dim {
            let mean = d.iter().map(|v| v[k]).sum::<f64>() / d.len() as f64;
            let sd = (expected[k * dim + k] / d.len() as f64).sqrt();
            assert!(mean.abs() <= 5.0 * sd + 1e-9, "{label}: mean {mean} at {k}");
        }
    }
}

#[test]
fn constant_noise_has_covariance_c_v_identity() {
    let (net, data) = setup();
    let (c, v) = (0.05, 2.0);
    let mut s = stage(Arc::new(Constant { variance: v }), c, 9);
    let d = draws(&mut s, &net, &data, 20_000);
    let dim = d[0].len();
    let expected: Vec<f64> = (0..dim * dim)
        .map(|k| if k / dim == k % dim { c * v } else { 0.0 })
        .collect();
    assert_second_moment(&d, &expected, 0.1, "constant");
    let g = s.gradient(&net, &data, forward).unwrap();
    assert!((g.noise_trace.unwrap() - c * v * dim as f64).abs() < 1e-9);
}

#[test]
fn zero_scale_gives_the_plain_step_bit_for_bit() {
    let (net, data) = setup();
    let table = ParamTable::of(&net);
    let reference = plain(&net, &data);
    for name in [
        StructureName::Bernoulli,
        StructureName::Subset,
        StructureName::Constant,
    ] {
        let structure = name
            .build(&StructureOptions {
                subset: Some(3),
                ..StructureOptions::default()
            })
            .unwrap();
        for config in [
            NoiseConfig::paper(structure.clone(), 2).with_kappa(0.0),
            NoiseConfig {
                scale: ScaleRule::Fixed { c: 0.0 },
                ..NoiseConfig::none().with_structure(structure)
            },
        ] {
            let mut s = NoiseStage::new(config, B, 1).unwrap();
            let mut g = s.gradient(&net, &data, forward).unwrap();
            let got = flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap());
            assert_eq!(got, reference, "{name}");
        }
    }
}

#[test]
fn the_forms_are_named_and_refuse_impossible_options() {
    let options = StructureOptions::default();
    assert!(StructureName::Subset.build(&options).is_err());
    assert!(
        StructureName::Constant
            .build(&StructureOptions {
                variance: -1.0,
                ..options
            })
            .is_err()
    );
    for name in StructureName::ALL {
        assert_eq!(name.as_str().parse::<StructureName>().unwrap(), name);
    }
    // A subset larger than the batch is refused at the step.
    let (net, data) = setup();
    let mut s = stage(Arc::new(Subset { size: B + 1 }), 0.1, 0);
    assert!(s.gradient(&net, &data, forward).is_err());
}
