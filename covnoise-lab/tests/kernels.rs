//! The fast flex kernels (`covnoise::kernels`) against burn's own ops:
//! convolution forward and its input, weight and bias gradients; batch
//! normalization's output, its input, scale and shift gradients and the
//! running statistics; max pooling's output and input gradient; ReLU and
//! its gradient; and 20 training steps of LeNet-5 and ResNet-20.
//!
//! The shapes are drawn afresh each run from the grid (seed
//! printed; `COVNOISE_TEST_SEED=N` repeats a run), and every buffer the
//! kernels allocate is filled with NaN first, so that an element a kernel
//! fails to write fails the comparison.
//!
//! Tolerance: 1e-5 of the largest reference value (max-norm relative).
//! Both paths compute the same sums of `f32` products in different orders
//! (up to `C_in k² = 1600` terms per output, `B H' W' ≈ 11,000` per weight
//! gradient); with 24-bit mantissas and blocked summation their rounding
//! differences stay near 1e-6 of the largest value, while any wrong index,
//! tap, padding, stride or missing term moves some element by the order of
//! the values themselves.

use burn::backend::Dispatch;
use burn::module::Param;
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use covnoise::kernels::{self, FastKernels};
use covnoise::model::{Batch, GhostBatchNorm, labels_tensor};
use covnoise::noise::{NoiseConfig, NoiseStage};
use covnoise::optim::SgdConfig;
use covnoise::tensor_util::to_vec;
use covnoise_lab::zoo::{Architecture, Network, NetworkConfig, Normalization};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The seed of this run: `COVNOISE_TEST_SEED`, else the clock.
fn run_seed() -> u64 {
    let seed = std::env::var("COVNOISE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kernel tests: COVNOISE_TEST_SEED={seed}");
    seed
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, from: &[T]) -> T {
    from[rng.random_range(0..from.len())]
}

fn random(rng: &mut ChaCha8Rng, n: usize, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|_| offset + rng.random_range(-1.0f32..1.0))
        .collect()
}

/// Asserts `fast` equals `reference` within `tol` of the largest reference
/// magnitude, and that every element is finite (an unwritten, poisoned
/// element is NaN).
fn assert_close(what: &str, fast: &[f32], reference: &[f32], tol: f64) {
    assert_eq!(fast.len(), reference.len(), "{what}: length");
    if let Some(i) = fast.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (not written?)", fast[i]);
    }
    let scale = reference
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-30);
    let (i, err) = fast
        .iter()
        .zip(reference)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .enumerate()
        .fold(
            (0, 0.0),
            |(bi, be), (i, e)| if e > be { (i, e) } else { (bi, be) },
        );
    assert!(
        err <= tol * scale,
        "{what}: element {i}: {} vs {} (error {:.2e} of the largest value {scale:.3e})",
        fast[i],
        reference[i],
        err / scale
    );
}

/// One convolution to test.
#[derive(Debug, Clone)]
struct ConvCase {
    batch: usize,
    c_in: usize,
    c_out: usize,
    size: [usize; 2],
    kernel: [usize; 2],
    options: ConvOptions<2>,
    bias: bool,
}

/// Forward output and the input, weight and bias gradients of `sum(y dy)`.
/// (With a bias, its gradient comes with its exact value.)
type ConvResult = (Vec<f32>, Vec<f32>, Vec<f32>, Option<(Vec<f32>, Vec<f32>)>);

/// The output size `[H', W']` of `case`.
fn output_size(case: &ConvCase) -> [usize; 2] {
    let size = |n: usize, k: usize, axis: usize| {
        let (begin, end) = case.options.padding[axis];
        (n + begin + end - k) / case.options.stride[axis] + 1
    };
    [
        size(case.size[0], case.kernel[0], 0),
        size(case.size[1], case.kernel[1], 1),
    ]
}

/// The fast kernel through burn's dispatch, whatever the output size.
fn fast_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: &ConvOptions<2>,
) -> Tensor<4> {
    let (x, w) = (x.into_dispatch(), weight.into_dispatch());
    let (stride, padding) = (options.stride, options.padding);
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as FastKernels>::fast_conv2d_bias(
            x,
            w,
            b.into_dispatch(),
            stride,
            padding,
            1,
            None,
        ),
        None => <Dispatch as FastKernels>::fast_conv2d(x, w, stride, padding, 1, None),
    })
}

fn run_conv(case: &ConvCase, seed: u64, fast: bool) -> ConvResult {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::flex().autodiff();
    let [h, w] = case.size;
    let [kh, kw] = case.kernel;
    let x_shape = [case.batch, case.c_in, h, w];
    let w_shape = [case.c_out, case.c_in / case.options.groups, kh, kw];
    let x_vals = random(&mut rng, x_shape.iter().product(), 0.0);
    let w_vals = random(&mut rng, w_shape.iter().product(), 0.0);
    let b_vals = random(&mut rng, case.c_out, 0.0);
    let tensor = |v: &[f32], shape: [usize; 4]| {
        Tensor::<4>::from_data(TensorData::new(v.to_vec(), shape), &dev).require_grad()
    };
    kernels::with_enabled(fast, || {
        let x = tensor(&x_vals, x_shape);
        let weight = tensor(&w_vals, w_shape);
        let bias = case
            .bias
            .then(|| Tensor::<1>::from_data(TensorData::new(b_vals.clone(), [case.c_out]), &dev))
            .map(Tensor::require_grad);
        let covered = case.options.groups == 1 && case.options.dilation == [1, 1];
        let [ho, wo] = output_size(case);
        assert_eq!(
            kernels::conv2d_is_fast(&x, &weight, bias.as_ref(), &case.options),
            fast && covered && ho * wo >= kernels::MIN_POSITIONS,
            "{case:?}"
        );
        // Below MIN_POSITIONS `conv2d` runs burn's op, so the kernels are
        // called through the extension directly there, to test them on the
        // whole grid.
        let conv = |x: Tensor<4>, w: Tensor<4>, b: Option<Tensor<1>>| {
            if fast && covered {
                fast_conv2d(x, w, b, &case.options)
            } else {
                kernels::conv2d(x, w, b, case.options.clone())
            }
        };
        let y = conv(x.clone(), weight.clone(), bias.clone());
        // The plain (non-autodiff) device takes the flex implementation.
        let y_inner = conv(
            x.clone().inner(),
            weight.clone().inner(),
            bias.clone().map(Tensor::inner),
        );
        assert_close(
            "forward without autodiff",
            &to_vec(&y_inner).unwrap(),
            &to_vec(&y.clone().inner()).unwrap(),
            0.0,
        );
        let dy_vals = random(&mut rng, y.dims().iter().product(), 0.0);
        // The bias gradient's exact value: a float64 sum of the output
        // gradient per channel.
        let per_channel = y.dims()[2] * y.dims()[3];
        let mut exact_db = vec![0.0f64; case.c_out];
        for (i, v) in dy_vals.iter().enumerate() {
            exact_db[(i / per_channel) % case.c_out] += *v as f64;
        }
        let exact_db: Vec<f32> = exact_db.into_iter().map(|v| v as f32).collect();
        let dy = Tensor::<4>::from_data(TensorData::new(dy_vals, y.dims()), &dev);
        let grads = (y.clone() * dy).sum().backward();
        (
            to_vec(&y).unwrap(),
            to_vec(&x.grad(&grads).unwrap()).unwrap(),
            to_vec(&weight.grad(&grads).unwrap()).unwrap(),
            bias.map(|b| (to_vec(&b.grad(&grads).unwrap()).unwrap(), exact_db)),
        )
    })
}

/// The fast convolution and its three gradients against burn's conv2d and
/// burn's autodiff of it, on the same operands and output gradient.
fn check_conv(case: &ConvCase, seed: u64) {
    kernels::poison_outputs(true);
    let fast = run_conv(case, seed, true);
    let reference = run_conv(case, seed, false);
    let what = |part: &str| format!("{part} of {case:?} (seed {seed})");
    let tol = 1e-5;
    assert_close(&what("forward"), &fast.0, &reference.0, tol);
    assert_close(&what("input gradient"), &fast.1, &reference.1, tol);
    assert_close(&what("weight gradient"), &fast.2, &reference.2, tol);
    // The bias gradient sums B H' W' output gradients of both signs, up to
    // 10,000 terms that can cancel to a small fraction of their spread:
    // burn's f32 reduction then misses its own result by more than 1e-5
    // relative (7e-5 seen), the kernel's f64 one by one rounding, so the
    // kernel is held to the exact (float64) sum instead.
    if let Some((a, exact)) = &fast.3 {
        assert!(reference.3.is_some());
        assert_close(&what("bias gradient"), a, exact, tol);
    }
}

#[test]
fn conv2d_and_its_gradients_equal_burns_on_a_random_grid_of_shapes() {
    let seed = run_seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in 0..14 {
        let k = pick(&mut rng, &[1usize, 3, 5]);
        let stride = pick(&mut rng, &[1usize, 2]);
        let padding = pick(&mut rng, &[0usize, 1, 2]);
        let odd = [5usize, 7, 9, 11, 13];
        let c_in = pick(&mut rng, &[1, 3, 16, 64]);
        let mut c_out = pick(&mut rng, &[1, 3, 16, 64]);
        // A one-element weight (1 in, 1 out, 1x1) is a single sum of
        // B H' W' terms of both signs that can cancel far below their
        // spread, where burn's f32 reduction itself misses by more than
        // 1e-5 of the result: a flake, not a test of the kernel.
        if c_in == 1 && c_out == 1 && k == 1 {
            c_out = 3;
        }
        let case = ConvCase {
            batch: pick(&mut rng, &[1, 3, 64]),
            c_in,
            c_out,
            size: [pick(&mut rng, &odd), pick(&mut rng, &odd)],
            kernel: [k, k],
            options: ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1),
            bias: rng.random_range(0..4) > 0,
        };
        check_conv(&case, seed.wrapping_add(i));
    }
}

#[test]
fn conv2d_covers_pointwise_asymmetric_and_rectangular_cases_and_falls_back_on_the_rest() {
    let seed = run_seed();
    let case = |batch, c_in, c_out, size, kernel, options, bias| ConvCase {
        batch,
        c_in,
        c_out,
        size,
        kernel,
        options,
        bias,
    };
    let cases = [
        // 1x1, stride 1, no padding: the input is its own unfolding.
        case(
            3,
            16,
            8,
            [7, 9],
            [1, 1],
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
            true,
        ),
        // 1x1 with stride 2 and padding: unfolded after all.
        case(
            3,
            4,
            5,
            [7, 7],
            [1, 1],
            ConvOptions::new([2, 2], [1, 1], [1, 1], 1),
            false,
        ),
        // burn's `Same` for an even kernel: padding (0, 1) on each axis.
        case(
            5,
            3,
            4,
            [8, 7],
            [2, 2],
            ConvOptions::new_with_padding([1, 1], [(0, 1), (0, 1)], [1, 1], 1),
            true,
        ),
        // A rectangular kernel, unequal strides, asymmetric padding.
        case(
            4,
            2,
            3,
            [9, 6],
            [3, 1],
            ConvOptions::new_with_padding([2, 1], [(2, 0), (1, 2)], [1, 1], 1),
            true,
        ),
        // A column stride of 3 (every other case strides by 1 or 2 along
        // the rows), on a width of 8 with lopsided padding and a kernel 4
        // wide, so that im2col's and col2im's strided runs start and end
        // at different columns for each tap.
        case(
            3,
            5,
            4,
            [7, 8],
            [2, 4],
            ConvOptions::new_with_padding([1, 3], [(1, 0), (2, 1)], [1, 1], 1),
            true,
        ),
        // Padding as large as the kernel: some taps see only zeros.
        case(
            2,
            2,
            2,
            [3, 3],
            [3, 3],
            ConvOptions::new([2, 2], [3, 3], [1, 1], 1),
            true,
        ),
        // Stride 1 with 8 or more input channels: one product per kernel
        // row on the input unfolded along the kernel's width. With "same"
        // padding (output as wide as the input) each unfolded plane is one
        // shifted copy with the wrapped columns zeroed after, here on a
        // non-square image, input and output gradients included...
        case(
            3,
            16,
            8,
            [6, 7],
            [3, 3],
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            true,
        ),
        // ...with shifts of two columns, on an image two columns wide
        // (kernel column 0 meets no input column at all)...
        case(
            2,
            8,
            9,
            [5, 2],
            [5, 5],
            ConvOptions::new([1, 1], [2, 2], [1, 1], 1),
            false,
        ),
        // ...and row by row otherwise: asymmetric padding and a
        // rectangular kernel...
        case(
            3,
            9,
            5,
            [7, 10],
            [3, 2],
            ConvOptions::new_with_padding([1, 1], [(2, 0), (1, 1)], [1, 1], 1),
            true,
        ),
        // ...and padding beyond k - 1 (its input gradient takes col2im).
        case(
            2,
            8,
            4,
            [5, 6],
            [3, 3],
            ConvOptions::new([1, 1], [3, 3], [1, 1], 1),
            false,
        ),
        // Dilation and groups run burn's op (checked by `run_conv`).
        case(
            2,
            4,
            6,
            [9, 9],
            [3, 3],
            ConvOptions::new([1, 1], [1, 1], [2, 2], 1),
            true,
        ),
        case(
            2,
            4,
            6,
            [9, 9],
            [3, 3],
            ConvOptions::new([1, 1], [1, 1], [1, 1], 2),
            true,
        ),
    ];
    for (i, c) in cases.iter().enumerate() {
        check_conv(c, seed.wrapping_add(i as u64));
    }
}

/// One batch-norm layer to test: `[batch, channels, h, w]`, ghost groups
/// of `group` examples (0: the whole batch).
#[derive(Debug, Clone, Copy)]
struct NormCase {
    batch: usize,
    channels: usize,
    size: [usize; 2],
    group: usize,
    offset: f32,
}

/// Output, input, scale and shift gradients, running mean and variance.
type NormResult = [Vec<f32>; 6];

/// The input, output gradient, scale and shift of `case` from `seed`.
fn norm_inputs(case: &NormCase, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = case.batch * case.channels * case.size[0] * case.size[1];
    let x = random(&mut rng, n, case.offset);
    let dy = random(&mut rng, n, 0.0);
    let gamma = random(&mut rng, case.channels, 1.0);
    let beta = random(&mut rng, case.channels, 0.0);
    (x, dy, gamma, beta)
}

fn run_norm(case: &NormCase, seed: u64, fast: bool) -> NormResult {
    let dev = Device::flex().autodiff();
    let [h, w] = case.size;
    let (b, c) = (case.batch, case.channels);
    let shape = [b, c, h, w];
    let (x_vals, dy_vals, gamma, beta) = norm_inputs(case, seed);
    let vec1 = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [c]), &dev);
    kernels::with_enabled(fast, || {
        let mut bn = GhostBatchNorm::new(c, case.group, &dev);
        bn.gamma = Param::from_tensor(vec1(&gamma));
        bn.beta = Param::from_tensor(vec1(&beta));
        let x = Tensor::<4>::from_data(TensorData::new(x_vals, shape), &dev).require_grad();
        let groups = b.checked_div(case.group).unwrap_or(1);
        let direct = kernels::batch_norm(x.clone(), bn.gamma.val(), bn.beta.val(), groups, 1e-5);
        assert_eq!(direct.is_some(), fast, "{case:?}");
        let (gamma_t, beta_t) = (bn.gamma.val(), bn.beta.val());
        let y = bn.forward_images(x.clone());
        let dy = Tensor::<4>::from_data(TensorData::new(dy_vals, shape), &dev);
        let grads = (y.clone() * dy).sum().backward();
        [
            to_vec(&y).unwrap(),
            to_vec(&x.grad(&grads).unwrap()).unwrap(),
            to_vec(&gamma_t.grad(&grads).unwrap()).unwrap(),
            to_vec(&beta_t.grad(&grads).unwrap()).unwrap(),
            to_vec(&bn.running_mean.value()).unwrap(),
            to_vec(&bn.running_var.value()).unwrap(),
        ]
    })
}

#[test]
fn batch_norm_and_its_gradients_equal_burns_ops_on_a_random_grid_of_shapes() {
    let seed = run_seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    kernels::poison_outputs(true);
    for i in 0..12 {
        let batch = pick(&mut rng, &[1usize, 3, 64]);
        let odd = [3usize, 5, 7, 9, 11];
        let case = NormCase {
            batch,
            channels: pick(&mut rng, &[1, 3, 16, 64]),
            size: [pick(&mut rng, &odd), pick(&mut rng, &odd)],
            // Whole batch, or ghost groups that divide it.
            group: match (batch, rng.random_range(0..2)) {
                (_, 0) | (1, _) => 0,
                (3, _) => 1,
                _ => pick(&mut rng, &[4, 16, 32]),
            },
            // Values off 0 test the statistics' cancellation; far off 0
            // burn's f32 reductions are the less exact side (see
            // `batch_norm_far_from_zero_matches_a_float64_reference`).
            offset: pick(&mut rng, &[0.0, 3.0, -3.0]),
        };
        let s = seed.wrapping_add(i);
        let fast = run_norm(&case, s, true);
        let mut reference = run_norm(&case, s, false);
        // The scale and shift gradients sum B H W terms of both signs per
        // channel, which can cancel to a small fraction of their spread
        // (one channel: one such sum is the whole tensor); burn's f32
        // reductions then miss by more than 1e-5 relative (4.5e-5 seen),
        // the kernel's f64 ones do not, so those two are held to a float64
        // computation of the same layer.
        let (x, dy, gamma, beta) = norm_inputs(&case, s);
        let [h, w] = case.size;
        let groups = case.batch.checked_div(case.group).unwrap_or(1);
        let shape = [case.batch, case.channels, h * w];
        let [_, _, dgamma, dbeta] = batch_norm_f64(shape, groups, &x, &dy, &gamma, &beta);
        reference[2] = dgamma;
        reference[3] = dbeta;
        let names = [
            "output",
            "input gradient",
            "scale gradient (float64 reference)",
            "shift gradient (float64 reference)",
            "running mean",
            "running variance",
        ];
        for ((name, a), r) in names.iter().zip(&fast).zip(&reference) {
            assert_close(&format!("{name} of {case:?} (seed {s})"), a, r, 1e-5);
        }
    }
}

/// Per-step losses of `steps` plain SGD steps (momentum 0.9) of
/// `architecture` on one fixed batch, with the fast kernels on or off.
fn train_losses(
    architecture: Architecture,
    batch: usize,
    lr: f64,
    steps: usize,
    fast: bool,
    nudge: f32,
) -> Vec<f64> {
    let dev = Device::flex().autodiff();
    let input = architecture.input_shape().unwrap();
    let config = NetworkConfig {
        architecture,
        input,
        classes: 10,
        hidden: vec![],
        normalization: if architecture.has_batch_norm() {
            Normalization::BatchNorm
        } else {
            Normalization::None
        },
        layers: Vec::new(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let n = batch * input.iter().product::<usize>();
    let x: Vec<f32> = random(&mut rng, n, 0.0)
        .into_iter()
        .map(|v| v * (1.0 + nudge))
        .collect();
    let data = Batch {
        x: Tensor::<4>::from_data(
            TensorData::new(x, [batch, input[0], input[1], input[2]]),
            &dev,
        ),
        labels: labels_tensor(
            &(0..batch).map(|i| (i % 10) as u8).collect::<Vec<_>>(),
            &dev,
        ),
    };
    kernels::with_enabled(fast, || {
        let mut model = Some(Network::new(&config, 3, &dev).unwrap());
        let mut stage = NoiseStage::new(NoiseConfig::none(), batch, 0).unwrap();
        let mut sgd = SgdConfig {
            momentum: 0.9,
            ..Default::default()
        }
        .init()
        .unwrap();
        (0..steps)
            .map(|_| {
                let m = model.take().unwrap();
                let g = stage
                    .gradient(&m, &data, |m: &Network, b: &Batch<4>, p| {
                        m.objective(b.x.clone(), b.labels.clone(), p)
                    })
                    .unwrap();
                model = Some(sgd.step(lr, m, g.grads));
                g.loss
            })
            .collect()
    })
}

/// 20 steps on the fast kernels against 20 on burn's ops, one fixed batch.
///
/// Tolerance, per step: 20 times the largest relative loss difference so
/// far between burn's path and burn's path on the input scaled by
/// `1 ± 2^-21` (4-ulp nudges, the controls), and at least 1e-5. The fast
/// kernels and burn's ops differ by rounding alone (their sums run in other
/// orders; against a float64 convolution the kernels' error is about 1e-7
/// of the largest value, burn's up to 8e-7), and training amplifies
/// rounding as it amplifies the nudges: LeNet-5 stays within 1e-7 for 20
/// steps, while ResNet-20 with batch norm over 16 examples carries both to
/// a few 1e-3 by step 15 (measured: the fast path within 6.2 times the
/// controls at every step). A wrong gradient anywhere changes the loss at
/// the next step by far more than 1e-5, where the controls are still at
/// their rounding floor.
fn check_training(architecture: Architecture, batch: usize, lr: f64) {
    kernels::poison_outputs(true);
    let fast = train_losses(architecture, batch, lr, 20, true, 0.0);
    let reference = train_losses(architecture, batch, lr, 20, false, 0.0);
    // Two controls, the input scaled by 1 ± 4 ulp: a single one-ulp nudge
    // leaves most inputs unchanged and its loss can stay bit-identical for
    // the first steps while rounding elsewhere has already grown.
    let controls: Vec<Vec<f64>> = [4.0 * f32::EPSILON, -4.0 * f32::EPSILON]
        .iter()
        .map(|&nudge| train_losses(architecture, batch, lr, 20, false, nudge))
        .collect();
    assert!(
        reference.last().unwrap() < &(0.97 * reference[0]),
        "{architecture}: the reference run learns ({reference:?})"
    );
    let mut control_so_far = 0.0f64;
    for (step, (a, b)) in fast.iter().zip(&reference).enumerate() {
        let err = (a - b).abs() / b.abs();
        for c in &controls {
            control_so_far = control_so_far.max((c[step] - b).abs() / b.abs());
        }
        let tol = (20.0 * control_so_far).max(1e-5);
        eprintln!(
            "{architecture} step {step}: relative difference {err:.2e}, control {control_so_far:.2e}"
        );
        assert!(
            err <= tol,
            "{architecture} step {step}: loss {a} on the fast kernels, {b} on burn's ops (relative {err:.2e}, tolerance {tol:.2e})"
        );
    }
}

#[test]
fn lenet5_trains_the_same_on_the_fast_kernels_as_on_burns_ops() {
    check_training(Architecture::LeNet5, 32, 0.1);
}

#[test]
fn resnet20_trains_the_same_on_the_fast_kernels_as_on_burns_ops() {
    check_training(Architecture::ResNet20, 16, 0.01);
}

/// Batch norm in `f64` on the host, for `x` `[b, c, s]` in `groups`
/// groups: output, input gradient, scale and shift gradients for output
/// gradient `dy`.
fn batch_norm_f64(
    [b, c, s]: [usize; 3],
    groups: usize,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    beta: &[f32],
) -> [Vec<f32>; 4] {
    let g_size = b / groups;
    let n = (g_size * s) as f64;
    let (mut y, mut dx) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
    let (mut dgamma, mut dbeta) = (vec![0.0f64; c], vec![0.0f64; c]);
    for g in 0..groups {
        for ch in 0..c {
            let idx: Vec<usize> = (g * g_size..(g + 1) * g_size)
                .flat_map(|e| (0..s).map(move |p| (e * c + ch) * s + p))
                .collect();
            let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / n;
            let var = idx
                .iter()
                .map(|&i| (x[i] as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let inv = 1.0 / (var + 1e-5).sqrt();
            let xhat = |i: usize| (x[i] as f64 - mean) * inv;
            let sum_dy: f64 = idx.iter().map(|&i| dy[i] as f64).sum();
            let sum_dy_xhat: f64 = idx.iter().map(|&i| dy[i] as f64 * xhat(i)).sum();
            dbeta[ch] += sum_dy;
            dgamma[ch] += sum_dy_xhat;
            for &i in &idx {
                y[i] = (xhat(i) * gamma[ch] as f64 + beta[ch] as f64) as f32;
                let d = dy[i] as f64 - sum_dy / n - xhat(i) * sum_dy_xhat / n;
                dx[i] = (gamma[ch] as f64 * inv * d) as f32;
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    [y, dx, f(dgamma), f(dbeta)]
}

/// Far from 0 (values -100 +- 1) the kernels' statistics, accumulated in
/// `f64` from data shifted by one of its values, keep the output and all
/// gradients within 1e-5 of a float64 computation; burn's f32 reductions
/// lose about `ulp(100) / spread`, 1e-5 itself, there, so this case is
/// checked against the float64 reference rather than against burn.
#[test]
fn batch_norm_far_from_zero_matches_a_float64_reference() {
    kernels::poison_outputs(true);
    let mut rng = ChaCha8Rng::seed_from_u64(run_seed());
    let dev = Device::flex().autodiff();
    let ([b, c, h, w], groups) = ([6usize, 5, 7, 9], 2usize);
    let x = random(&mut rng, b * c * h * w, -100.0);
    let dy = random(&mut rng, b * c * h * w, 0.0);
    let gamma = random(&mut rng, c, 1.0);
    let beta = random(&mut rng, c, 0.0);
    let expected = batch_norm_f64([b, c, h * w], groups, &x, &dy, &gamma, &beta);
    let xt = Tensor::<4>::from_data(TensorData::new(x, [b, c, h, w]), &dev).require_grad();
    let vec1 =
        |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [c]), &dev).require_grad();
    let (gt, bt) = (vec1(&gamma), vec1(&beta));
    let out = kernels::batch_norm(xt.clone(), gt.clone(), bt.clone(), groups, 1e-5)
        .expect("the kernel applies on flex");
    let dyt = Tensor::<4>::from_data(TensorData::new(dy, [b, c, h, w]), &dev);
    let grads = (out.output.clone() * dyt).sum().backward();
    let got = [
        to_vec(&out.output).unwrap(),
        to_vec(&xt.grad(&grads).unwrap()).unwrap(),
        to_vec(&gt.grad(&grads).unwrap()).unwrap(),
        to_vec(&bt.grad(&grads).unwrap()).unwrap(),
    ];
    for ((name, a), e) in [
        "output",
        "input gradient",
        "scale gradient",
        "shift gradient",
    ]
    .iter()
    .zip(&got)
    .zip(&expected)
    {
        assert_close(name, a, e, 1e-5);
    }
}

/// Max pooling's output and input gradient on the fast kernel against
/// burn's op, on a random grid of shapes, windows, strides (overlapping
/// windows included) and paddings, with a third of the inputs exactly 0
/// (what a ReLU before the pooling leaves), so that windows hold ties: the
/// kernel must take burn's first maximum. The outputs are copies of inputs
/// and must be equal exactly; each input gradient sums the same output
/// gradients (overlapping windows), so it may differ in rounding only.
/// Shapes the kernel does not cover (asymmetric padding, dilation, ceil
/// mode) run burn's op and agree trivially.
#[test]
fn max_pooling_and_its_gradient_equal_burns_on_a_random_grid_of_shapes() {
    let seed = run_seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9001);
    let dev = Device::flex().autodiff();
    for _ in 0..24 {
        let k = pick(&mut rng, &[2usize, 3]);
        let stride = pick(&mut rng, &[1usize, 2, 3]);
        let padding = pick(&mut rng, &[0usize, 1]).min(k / 2);
        let shape = [
            pick(&mut rng, &[1usize, 3, 16]),
            pick(&mut rng, &[1usize, 6]),
            pick(&mut rng, &[5usize, 8, 13]),
            pick(&mut rng, &[4usize, 7, 10]),
        ];
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random_range(0..3) == 0 {
                    0.0
                } else {
                    rng.random_range(-1.0f32..1.0)
                }
            })
            .collect();
        let options = MaxPoolOptions::new([k, k])
            .with_stride([stride, stride])
            .with_padding([padding, padding]);
        let run = |fast: bool| {
            kernels::with_enabled(fast, || {
                let x = Tensor::<4>::from_data(TensorData::new(values.clone(), shape), &dev)
                    .require_grad();
                let y = kernels::max_pool2d(x.clone(), options.clone());
                // A gradient that differs per output, so that one routed
                // to the wrong position shows.
                let weights = Tensor::<4>::from_data(
                    TensorData::new(
                        (0..y.dims().iter().product::<usize>())
                            .map(|i| 1.0 + (i % 7) as f32)
                            .collect::<Vec<f32>>(),
                        y.dims(),
                    ),
                    &dev,
                );
                let grads = (y.clone() * weights).sum().backward();
                let dx = x.grad(&grads).expect("x takes a gradient");
                (
                    to_vec(&y.detach().inner().reshape([-1])).unwrap(),
                    to_vec(&dx.reshape([-1])).unwrap(),
                )
            })
        };
        let ((y_fast, dx_fast), (y_burn, dx_burn)) = (run(true), run(false));
        let what = format!("{shape:?}, kernel {k}, stride {stride}, padding {padding}");
        assert_eq!(y_fast, y_burn, "outputs, {what}");
        assert_close(&format!("input gradient, {what}"), &dx_fast, &dx_burn, 1e-6);
    }
}

/// `n` values uniform in [-1, 1), one in eight replaced by a zero, a
/// negative zero, NaN or an infinity.
fn with_specials(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let special = [0.0f32, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    (0..n)
        .map(|_| match rng.random_range(0..8) {
            0 => special[rng.random_range(0..special.len())],
            _ => rng.random_range(-1.0f32..1.0),
        })
        .collect()
}

/// The bits of each value, every NaN as one pattern: outputs compared bit
/// for bit, NaN where the reference has NaN.
fn bits(t: Vec<f32>) -> Vec<u32> {
    t.into_iter()
        .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
        .collect()
}

/// ReLU on the fast kernel against burn's, forward and backward through
/// autodiff, on tensors of ranks 2 and 4 that end inside, at and across
/// the kernel's blocks of 16,384 values, with zeros, signed zeros, NaN and
/// infinities among the inputs; on an input something else still holds
/// (a new output) and on one held by nothing else (written in place).
/// Both are a selection, not arithmetic, so outputs and gradients must
/// agree bit for bit (NaN where burn has NaN).
#[test]
fn relu_and_its_gradient_equal_burns() {
    let seed = run_seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4e1);
    let dev = Device::flex().autodiff();
    for shape in [
        [3usize, 5, 1, 1],
        [2, 8, 32, 32],
        [4, 16, 16, 17],
        [1, 1, 1, 16384],
    ] {
        let n: usize = shape.iter().product();
        let values = with_specials(&mut rng, n);
        let weights: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
        let run = |fast: bool, alone: bool| {
            kernels::with_enabled(fast, || {
                let x = Tensor::<4>::from_data(TensorData::new(values.clone(), shape), &dev)
                    .require_grad();
                let w = Tensor::<4>::from_data(TensorData::new(weights.clone(), shape), &dev);
                // Rank 2 as well: the kernel takes any rank. `x` keeps its
                // buffer; `x * 1` is a new one that only ReLU holds (the
                // same bits: NaN, infinities and signed zeros times 1).
                let input = if alone { x.clone() * 1.0 } else { x.clone() };
                let y = kernels::relu(input.reshape([shape[0] as i32, -1]));
                let grads = (y.clone().reshape(shape) * w).sum().backward();
                let dx = x.grad(&grads).expect("x takes a gradient");
                (
                    bits(to_vec(&y.detach().inner().reshape([-1])).unwrap()),
                    bits(to_vec(&dx.reshape([-1])).unwrap()),
                )
            })
        };
        for alone in [false, true] {
            let ((y_fast, dx_fast), (y_burn, dx_burn)) = (run(true, alone), run(false, alone));
            let what = format!("{shape:?}, input held elsewhere: {}", !alone);
            assert_eq!(y_fast, y_burn, "outputs, {what} (seed {seed})");
            assert_eq!(dx_fast, dx_burn, "input gradients, {what} (seed {seed})");
        }
    }
}

/// `relu(a + b)` on the fast kernel against burn's add then ReLU, forward
/// and the gradients of both operands through autodiff, on the shapes of
/// the ReLU test, with special values among the inputs; with `a` held
/// elsewhere (a new output) and held by nothing else (written in place),
/// and with the same tensor as both operands (its gradient the sum of
/// the two). The sum is rounded to `f32` before the ReLU on both paths and
/// the gradient is a selection, so all must agree bit for bit.
#[test]
fn the_fused_residual_sum_and_relu_equal_burns() {
    let seed = run_seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xadd);
    let dev = Device::flex().autodiff();
    for shape in [[3usize, 5, 1, 1], [2, 8, 32, 32], [1, 1, 1, 16385]] {
        let n: usize = shape.iter().product();
        let (va, vb) = (with_specials(&mut rng, n), with_specials(&mut rng, n));
        let weights: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
        let run = |fast: bool, alone: bool, same: bool| {
            kernels::with_enabled(fast, || {
                let tensor = |v: &Vec<f32>| {
                    Tensor::<4>::from_data(TensorData::new(v.clone(), shape), &dev).require_grad()
                };
                let (a, b) = (tensor(&va), tensor(&vb));
                let b = if same { a.clone() } else { b };
                let w = Tensor::<4>::from_data(TensorData::new(weights.clone(), shape), &dev);
                let left = if alone { a.clone() * 1.0 } else { a.clone() };
                let y = kernels::add_relu(left, b.clone());
                let grads = (y.clone() * w).sum().backward();
                let grad =
                    |t: &Tensor<4>| bits(to_vec(&t.grad(&grads).unwrap().reshape([-1])).unwrap());
                (
                    bits(to_vec(&y.detach().inner().reshape([-1])).unwrap()),
                    grad(&a),
                    grad(&b),
                )
            })
        };
        for (alone, same) in [(false, false), (true, false), (false, true)] {
            let what = format!("{shape:?}, a held elsewhere: {}, a + a: {same}", !alone);
            let (fast, burn) = (run(true, alone, same), run(false, alone, same));
            assert_eq!(fast.0, burn.0, "outputs, {what} (seed {seed})");
            assert_eq!(fast.1, burn.1, "gradients of a, {what} (seed {seed})");
            assert_eq!(fast.2, burn.2, "gradients of b, {what} (seed {seed})");
        }
    }
}
