//! What the gradient-norm penalty computes on a ReLU network (every model
//! in the zoo is one): the forward difference of Geiping et al.'s released
//! code, `(∇L(θ + εg) − ∇L(θ)) / ε` with `ε = r/‖g‖`, which on a piecewise
//! smooth loss is a smoothed penalty's gradient, not `H g`. The reference
//! is computed on the host in float64 for a one-hidden-layer ReLU MLP: the
//! network's gradient by hand, the exact `H g` by central differences with
//! a step so small that no unit crosses its kink (checked), where the loss
//! is smooth and the central difference errs by O(t²).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Int, Tensor, activation};
use covnoise::model::{Examples, Objective, Probes, labels_tensor};
use covnoise::moments::{self, PassRequest};
use covnoise::noise::{NoiseConfig, NoiseStage};
use covnoise::params::ParamTable;
use covnoise::regularizer::Regularizer;
use covnoise::tensor_util::to_vec;

mod common;
use common::{flat, norm};

const N: usize = 64;
const IN: usize = 5;
const HID: usize = 8;
const OUT: usize = 3;

fn device() -> Device {
    Device::flex().autodiff()
}

#[derive(Module, Debug)]
struct Relu {
    a: Linear,
    b: Linear,
}

struct Data {
    x: Tensor<2>,
    labels: Tensor<1, Int>,
    host_x: Vec<f64>,
    host_labels: Vec<usize>,
}

impl Examples for Data {
    fn len(&self) -> usize {
        self.labels.dims()[0]
    }
    fn slice(&self, start: usize, len: usize) -> Self {
        Data {
            x: self.x.clone().narrow(0, start, len),
            labels: self.labels.clone().narrow(0, start, len),
            host_x: self.host_x[start * IN..(start + len) * IN].to_vec(),
            host_labels: self.host_labels[start..start + len].to_vec(),
        }
    }
}

fn forward(m: &Relu, b: &Data, p: &mut Probes) -> Objective {
    let h = activation::relu(p.linear(&m.a, b.x.clone()));
    Objective::Classification {
        logits: p.linear(&m.b, h),
        labels: b.labels.clone(),
    }
}

/// The parameters in table order (a.weight `[IN, HID]`, a.bias, b.weight
/// `[HID, OUT]`, b.bias), as float64.
fn host_params(m: &Relu) -> Vec<f64> {
    let mut v = Vec::new();
    for t in [
        to_vec(&m.a.weight.val()).unwrap(),
        to_vec(&m.a.bias.as_ref().unwrap().val()).unwrap(),
        to_vec(&m.b.weight.val()).unwrap(),
        to_vec(&m.b.bias.as_ref().unwrap().val()).unwrap(),
    ] {
        v.extend(t.into_iter().map(f64::from));
    }
    v
}

/// The mean cross-entropy's gradient at `theta` in float64, and the
/// activation pattern (which (example, unit) pre-activations are > 0).
fn host_gradient(theta: &[f64], data: &Data) -> (Vec<f64>, Vec<bool>) {
    let (w1, rest) = theta.split_at(IN * HID);
    let (b1, rest) = rest.split_at(HID);
    let (w2, b2) = rest.split_at(HID * OUT);
    let mut grad = vec![0.0; theta.len()];
    let mut pattern = Vec::with_capacity(N * HID);
    for i in 0..N {
        let x = &data.host_x[i * IN..(i + 1) * IN];
        let z1: Vec<f64> = (0..HID)
            .map(|h| b1[h] + (0..IN).map(|k| x[k] * w1[k * HID + h]).sum::<f64>())
            .collect();
        let a1: Vec<f64> = z1.iter().map(|&z| z.max(0.0)).collect();
        pattern.extend(z1.iter().map(|&z| z > 0.0));
        let z2: Vec<f64> = (0..OUT)
            .map(|o| b2[o] + (0..HID).map(|h| a1[h] * w2[h * OUT + o]).sum::<f64>())
            .collect();
        let max = z2.iter().cloned().fold(f64::MIN, f64::max);
        let sum: f64 = z2.iter().map(|z| (z - max).exp()).sum();
        let dz2: Vec<f64> = (0..OUT)
            .map(|o| {
                let p = (z2[o] - max).exp() / sum;
                (p - if o == data.host_labels[i] { 1.0 } else { 0.0 }) / N as f64
            })
            .collect();
        let (gw1, rest) = grad.split_at_mut(IN * HID);
        let (gb1, rest) = rest.split_at_mut(HID);
        let (gw2, gb2) = rest.split_at_mut(HID * OUT);
        for o in 0..OUT {
            gb2[o] += dz2[o];
            for h in 0..HID {
                gw2[h * OUT + o] += a1[h] * dz2[o];
            }
        }
        for h in 0..HID {
            if z1[h] <= 0.0 {
                continue;
            }
            let dz1: f64 = (0..OUT).map(|o| dz2[o] * w2[h * OUT + o]).sum();
            gb1[h] += dz1;
            for k in 0..IN {
                gw1[k * HID + h] += x[k] * dz1;
            }
        }
    }
    (grad, pattern)
}

fn moved(theta: &[f64], dir: &[f64], t: f64) -> Vec<f64> {
    theta.iter().zip(dir).map(|(a, d)| a + t * d).collect()
}

fn flips(a: &[bool], b: &[bool]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&d) / norm(b)
}

fn setup() -> (Relu, Data) {
    let d = device();
    d.seed(11);
    let model = Relu {
        a: LinearConfig::new(IN, HID).init(&d),
        b: LinearConfig::new(HID, OUT).init(&d),
    };
    let x = Tensor::<2>::random([N, IN], Distribution::Normal(0.0, 1.0), &d);
    let host_x: Vec<f64> = to_vec(&x).unwrap().into_iter().map(f64::from).collect();
    let host_labels: Vec<usize> = (0..N).map(|i| (i * 7 + i / 5) % OUT).collect();
    let labels: Vec<u8> = host_labels.iter().map(|&l| l as u8).collect();
    let data = Data {
        labels: labels_tensor(&labels, &d),
        x,
        host_x,
        host_labels,
    };
    (model, data)
}

/// covnoise's penalty gradient divided by 2λ (one micro-batch): its
/// `(∇L(θ + εg) − ∇L(θ)) / ε`, from the stage's step minus the plain step.
fn covnoise_product(model: &Relu, data: &Data, r: f64) -> Vec<f64> {
    let table = ParamTable::of(model);
    let lambda = 0.5;
    let mut stage = NoiseStage::new(NoiseConfig::none(), N, 0)
        .unwrap()
        .with_regularizer(Regularizer::grad_norm(lambda, 1).with_fd_radius(r))
        .unwrap();
    let mut g = stage.gradient(model, data, forward).unwrap();
    let step = flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap());
    let plain = flat(
        &moments::backward_pass(model, &table, data, &forward, PassRequest::default())
            .unwrap()
            .grads,
    );
    step.iter()
        .zip(&plain)
        .map(|(s, p)| (s - p) / (2.0 * lambda))
        .collect()
}

#[test]
fn on_a_relu_network_the_penalty_is_the_forward_difference_not_the_hessian_product() {
    let (model, data) = setup();
    let theta = host_params(&model);
    let (g, pattern) = host_gradient(&theta, &data);
    // The float64 gradient is the network's: it matches burn's to float32
    // rounding (1e-6 relative; 1e-4 leaves room and catches any slip).
    let table = ParamTable::of(&model);
    let burn_g = flat(
        &moments::backward_pass(&model, &table, &data, &forward, PassRequest::default())
            .unwrap()
            .grads,
    );
    assert!(rel(&burn_g, &g) < 1e-4, "gradient {}", rel(&burn_g, &g));

    // Exact H g: central differences along g with a step so small that no
    // unit flips (the loss is smooth there; the error is O(t²) ~ 1e-12).
    let gn = norm(&g);
    let t = 1e-6 / gn;
    let (plus, p_plus) = host_gradient(&moved(&theta, &g, t), &data);
    let (minus, p_minus) = host_gradient(&moved(&theta, &g, -t), &data);
    assert_eq!(flips(&pattern, &p_plus) + flips(&pattern, &p_minus), 0);
    let exact: Vec<f64> = plus
        .iter()
        .zip(&minus)
        .map(|(a, b)| (a - b) / (2.0 * t))
        .collect();

    for r in [1e-1, 1e-2] {
        // Geiping's rule in float64: the forward difference at ε = r/‖g‖.
        let eps = r / gn;
        let (at, p_at) = host_gradient(&moved(&theta, &g, eps), &data);
        let flipped = flips(&pattern, &p_at);
        let forward_difference: Vec<f64> = at.iter().zip(&g).map(|(a, b)| (a - b) / eps).collect();
        // covnoise computes that rule: float32 rounding of two gradients
        // over ε is about 1e-7 ‖∇L‖ / (r ‖Hu‖), well below 1e-2 here.
        let ours = covnoise_product(&model, &data, r);
        let same = rel(&ours, &forward_difference);
        assert!(
            same < 1e-2,
            "r = {r}: covnoise vs forward difference {same}"
        );
        // And on a ReLU network that is not H g: units cross their kink
        // along the step, and the difference quotient picks up the jumps.
        // On the smooth tanh MLP the same r gives 0.56 % (tests/regularizer.rs).
        let off = rel(&forward_difference, &exact);
        assert!(
            flipped > 0,
            "r = {r}: no unit flipped; the test shows nothing"
        );
        assert!(
            off > 0.05,
            "r = {r}: {flipped} flips, forward difference only {off} from H g"
        );
        println!("r = {r}: {flipped} (example, unit) flips, forward difference {off:.3} from H g");
    }
}
