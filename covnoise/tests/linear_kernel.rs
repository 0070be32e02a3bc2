//! The Linear product on the fast kernel (`kernels::linear`,
//! `kernels::linear_layer`, which `Probes::linear` runs) against burn's own
//! `Linear::forward` (the kernels off): values and the gradients of the
//! input, weight and bias, for inputs with positions (`[B, T, in]`), with
//! and without bias, and with a frozen weight.

use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use covnoise::kernels;
use covnoise::tensor_util::to_vec;

fn device() -> Device {
    Device::flex().autodiff()
}

/// `‖a - b‖ / ‖b‖` over two tensors' values.
fn rel_err<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    let (a, b) = (to_vec(&a).unwrap(), to_vec(&b).unwrap());
    assert_eq!(a.len(), b.len());
    let diff: f64 = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (diff / norm.max(1e-300)).sqrt()
}

/// The output and the gradients of `x`, the weight and the bias (None
/// where they take none) of the objective `sum(layer(x) * r)`, with the
/// fast kernels on or off.
#[allow(clippy::type_complexity)]
fn run(
    layer: &Linear,
    x: &Tensor<3>,
    r: &Tensor<3>,
    fast: bool,
) -> (Tensor<3>, Tensor<3>, Option<Tensor<2>>, Option<Tensor<1>>) {
    kernels::with_enabled(fast, || {
        let x = x.clone().require_grad();
        let y = kernels::linear_layer(layer, x.clone());
        let grads = (y.clone() * r.clone()).sum().backward();
        let dx = x.grad(&grads).expect("x takes a gradient");
        let dw = layer.weight.val().grad(&grads);
        let db = layer.bias.as_ref().and_then(|b| b.val().grad(&grads));
        (y.inner(), dx, dw, db)
    })
}

/// float32 products over 37 inputs (or 12 rows for the weight) added in
/// another blocking than burn's: about 1e-7 relative; a transposed operand
/// or a missed bias is off by order one. 1e-5 separates the two.
#[test]
fn the_fast_linear_product_matches_burns_values_and_gradients() {
    let device = device();
    let (b, t, i, o) = (4, 3, 37, 29);
    for (bias, frozen) in [(true, false), (false, false), (true, true)] {
        let mut layer = LinearConfig::new(i, o).with_bias(bias).init(&device);
        if frozen {
            layer.weight = layer.weight.set_require_grad(false);
        }
        let x = Tensor::<3>::random([b, t, i], Distribution::Normal(0.0, 1.0), &device);
        let r = Tensor::<3>::random([b, t, o], Distribution::Normal(0.0, 1.0), &device);
        let w = layer.weight.val();
        assert!(
            kernels::linear_grouped_applies(&x.clone().reshape([b * t, i]), &w, b * t),
            "the fast kernel must apply"
        );
        let (y, dx, dw, db) = run(&layer, &x, &r, true);
        let (y_ref, dx_ref, dw_ref, db_ref) = run(&layer, &x, &r, false);
        let case = format!("bias {bias}, frozen {frozen}");
        assert!(rel_err(y, y_ref) <= 1e-5, "{case}: output");
        assert!(rel_err(dx, dx_ref) <= 1e-5, "{case}: input gradient");
        match (dw, dw_ref) {
            (Some(dw), Some(dw_ref)) => assert!(rel_err(dw, dw_ref) <= 1e-5, "{case}: weight"),
            (None, None) => assert!(frozen, "{case}: the weight took no gradient"),
            (got, want) => panic!(
                "{case}: weight gradient {} where burn's is {}",
                got.is_some(),
                want.is_some()
            ),
        }
        match (db, db_ref) {
            (Some(db), Some(db_ref)) => assert!(rel_err(db, db_ref) <= 1e-5, "{case}: bias"),
            (None, None) => assert!(!bias, "{case}: the bias took no gradient"),
            _ => panic!("{case}: bias gradients differ in presence"),
        }
    }
}

/// A vector input (no example dimension) goes to burn's forward, whose
/// values the layer gives.
#[test]
fn a_vector_input_runs_burns_forward() {
    let device = device();
    let layer = LinearConfig::new(5, 3).init(&device);
    let x = Tensor::<1>::random([5], Distribution::Normal(0.0, 1.0), &device);
    let y = kernels::linear_layer(&layer, x.clone());
    assert_eq!(to_vec(&y).unwrap(), to_vec(&layer.forward(x)).unwrap());
}
