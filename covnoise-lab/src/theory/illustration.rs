//! The two-dimensional illustration of the paper's Figure 1: from one point of
//! a least-squares problem, the clouds of one-step updates under small-batch
//! SGD and under a large batch plus isotropic, full-Fisher or diagonal-Fisher
//! noise of the same total variance.

use nalgebra::{Matrix2, SymmetricEigen, Vector2};
use rand::SeedableRng;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::TheoryError;

/// Rotation of the input distribution's principal axes, in degrees: anything
/// away from 0 and 90 makes the Fisher non-diagonal, so that diagonal noise
/// visibly differs from full-Fisher noise.
const INPUT_ROTATION_DEG: f64 = 35.0;
/// Standard deviations of the inputs along their two principal axes: a 4:1
/// ratio gives elongated contours (condition 16) that still fit one plot.
const INPUT_SCALES: [f64; 2] = [1.0, 0.25];
/// The weights that generate the targets.
const TRUE_WEIGHTS: [f64; 2] = [1.0, -1.0];
/// Standard deviation of the label noise. Large enough that near the start
/// point the per-example gradients scatter more than their mean, so the
/// (uncentered) Fisher is close to the gradient covariance and the full-Fisher
/// cloud can match the SGD cloud, as in the paper.
const LABEL_NOISE: f64 = 1.0;
/// Start point, as an offset from the optimum in the Hessian's eigenbasis
/// (steep axis, shallow axis): mostly along the shallow valley, like a point
/// late in training.
const START_OFFSET: [f64; 2] = [0.25, 1.6];

/// A synthetic 2-D least-squares data set: inputs x_i in R^2 (Gaussian with
/// rotated, unequal axes) and targets y_i = w_true^T x_i + noise; the loss is
/// L(w) = 1/(2N) sum_i (x_i^T w - y_i)^2.
#[derive(Debug, Clone)]
pub struct LeastSquares2d {
    /// Inputs x_i.
    pub inputs: Vec<Vector2<f64>>,
    /// Targets y_i.
    pub targets: Vec<f64>,
}

impl LeastSquares2d {
    /// Draws `examples` (at least 2) examples from a ChaCha8 generator seeded
    /// with `seed`.
    pub fn generate(examples: usize, seed: u64) -> Result<Self, TheoryError> {
        if examples < 2 {
            return Err(TheoryError::InvalidParameter {
                name: "examples".into(),
                value: examples.to_string(),
                reason: "need at least 2 examples".into(),
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (s, c) = INPUT_ROTATION_DEG.to_radians().sin_cos();
        let rotation = Matrix2::new(c, -s, s, c);
        let scales = Matrix2::new(INPUT_SCALES[0], 0.0, 0.0, INPUT_SCALES[1]);
        let mixing = rotation * scales;
        let w_true = Vector2::new(TRUE_WEIGHTS[0], TRUE_WEIGHTS[1]);
        let mut inputs = Vec::with_capacity(examples);
        let mut targets = Vec::with_capacity(examples);
        for _ in 0..examples {
            let z = Vector2::new(
                StandardNormal.sample(&mut rng),
                StandardNormal.sample(&mut rng),
            );
            let x = mixing * z;
            let eps: f64 = StandardNormal.sample(&mut rng);
            targets.push(w_true.dot(&x) + LABEL_NOISE * eps);
            inputs.push(x);
        }
        Ok(Self { inputs, targets })
    }

    /// Number of examples N.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// The loss L(w).
    pub fn loss(&self, w: &Vector2<f64>) -> f64 {
        let n = self.len() as f64;
        self.inputs
            .iter()
            .zip(&self.targets)
            .map(|(x, y)| (x.dot(w) - y).powi(2))
            .sum::<f64>()
            / (2.0 * n)
    }

    /// Gradient of example i's loss 1/2 (x_i^T w - y_i)^2: x_i (x_i^T w - y_i).
    pub fn example_gradient(&self, i: usize, w: &Vector2<f64>) -> Vector2<f64> {
        let x = &self.inputs[i];
        x * (x.dot(w) - self.targets[i])
    }

    /// Mean gradient over the examples in `batch` (the full gradient when
    /// `batch` lists every example once).
    pub fn batch_gradient(&self, batch: &[usize], w: &Vector2<f64>) -> Vector2<f64> {
        let sum: Vector2<f64> = batch.iter().map(|&i| self.example_gradient(i, w)).sum();
        sum / batch.len() as f64
    }

    /// The full gradient of L at w.
    pub fn gradient(&self, w: &Vector2<f64>) -> Vector2<f64> {
        let all: Vec<usize> = (0..self.len()).collect();
        self.batch_gradient(&all, w)
    }

    /// The Hessian (1/N) sum_i x_i x_i^T (constant: the loss is quadratic).
    pub fn hessian(&self) -> Matrix2<f64> {
        let sum: Matrix2<f64> = self.inputs.iter().map(|x| x * x.transpose()).sum();
        sum / self.len() as f64
    }

    /// The minimizer H^{-1} (1/N) sum_i x_i y_i; None if the inputs are
    /// degenerate (all on one line).
    pub fn optimum(&self) -> Option<Vector2<f64>> {
        let xy: Vector2<f64> = self
            .inputs
            .iter()
            .zip(&self.targets)
            .map(|(x, y)| x * *y)
            .sum();
        self.hessian()
            .try_inverse()
            .map(|inv| inv * xy / self.len() as f64)
    }

    /// The empirical Fisher F(w) = (1/N) sum_i g_i g_i^T (uncentered, as in
    /// docs/method.md section 2).
    pub fn fisher(&self, w: &Vector2<f64>) -> Matrix2<f64> {
        let sum: Matrix2<f64> = (0..self.len())
            .map(|i| {
                let g = self.example_gradient(i, w);
                g * g.transpose()
            })
            .sum();
        sum / self.len() as f64
    }

    /// The centered per-example gradient covariance Sigma(w) = F(w) - g g^T.
    pub fn gradient_covariance(&self, w: &Vector2<f64>) -> Matrix2<f64> {
        let g = self.gradient(w);
        self.fisher(w) - g * g.transpose()
    }
}

/// Settings of the illustration. [`Default`] gives the figure in the docs.
#[derive(Debug, Clone, PartialEq)]
pub struct IllustrationConfig {
    /// Number of examples N in the data set.
    pub examples: usize,
    /// Small batch B_S (the SGD reference).
    pub small_batch: usize,
    /// Large batch B_L (the batch the noise is added to).
    pub large_batch: usize,
    /// Step size (learning rate) of the one step.
    pub lr: f64,
    /// Number of one-step updates drawn per cloud.
    pub draws: usize,
    /// Seed of the data set and of the draws.
    pub seed: u64,
}

impl Default for IllustrationConfig {
    fn default() -> Self {
        Self {
            // Large enough that minibatch sampling is nearly with-replacement.
            examples: 4096,
            // B_S = 8 makes the SGD cloud wide enough to see at plot scale.
            small_batch: 8,
            // B_L = 256 keeps the large batch's own noise visibly smaller.
            large_batch: 256,
            // lr * lambda_max is about 1: a stable, visible step.
            lr: 1.0,
            draws: 600,
            seed: 0,
        }
    }
}

/// One cloud of one-step updates.
#[derive(Debug, Clone)]
pub struct Cloud {
    /// What produced it, for the panel title.
    pub label: String,
    /// The updated points w_1 = w_0 - lr * (noisy gradient).
    pub points: Vec<Vector2<f64>>,
    /// Their sample mean.
    pub mean: Vector2<f64>,
    /// Their sample covariance.
    pub cov: Matrix2<f64>,
    /// The covariance the cloud should have: lr^2 times the covariance of
    /// the (noisy) gradient, with the finite-population factor
    /// (N - B) / (N - 1) for minibatches drawn without replacement.
    pub predicted_cov: Matrix2<f64>,
}

impl Cloud {
    /// Sample correlation of the two coordinates.
    pub fn correlation(&self) -> f64 {
        self.cov[(0, 1)] / (self.cov[(0, 0)] * self.cov[(1, 1)]).sqrt()
    }

    /// ||predicted_cov - reference|| / ||reference|| (Frobenius norms): how
    /// far this cloud's predicted covariance is from `reference`, e.g.
    /// small-batch SGD's.
    pub fn predicted_gap(&self, reference: &Matrix2<f64>) -> f64 {
        (self.predicted_cov - reference).norm() / reference.norm()
    }
}

/// Everything the four-panel figure draws.
#[derive(Debug, Clone)]
pub struct Illustration {
    /// The settings used.
    pub config: IllustrationConfig,
    /// The start point w_0.
    pub start: Vector2<f64>,
    /// The minimizer w*.
    pub optimum: Vector2<f64>,
    /// The Hessian H: L(w) = min_loss + 1/2 (w - w*)^T H (w - w*).
    pub hessian: Matrix2<f64>,
    /// L(w*).
    pub min_loss: f64,
    /// Where one full-batch gradient step from w_0 lands.
    pub full_batch_step: Vector2<f64>,
    /// The empirical Fisher at w_0.
    pub fisher: Matrix2<f64>,
    /// Noise scale c = 1/B_S - 1/B_L (docs/method.md section 3, paper rule).
    pub noise_scale: f64,
    /// The clouds, in order: small-batch SGD, large batch + isotropic, + full
    /// Fisher, + diagonal Fisher.
    pub clouds: Vec<Cloud>,
}

impl Illustration {
    /// The loss at w (exact: the loss is quadratic).
    pub fn loss_at(&self, w: &Vector2<f64>) -> f64 {
        let e = w - self.optimum;
        self.min_loss + 0.5 * e.dot(&(self.hessian * e))
    }
}

/// Sample mean and covariance (divisor n - 1) of 2-D points.
fn mean_cov(points: &[Vector2<f64>]) -> (Vector2<f64>, Matrix2<f64>) {
    let n = points.len() as f64;
    let mean: Vector2<f64> = points.iter().sum::<Vector2<f64>>() / n;
    let cov: Matrix2<f64> = points
        .iter()
        .map(|p| (p - mean) * (p - mean).transpose())
        .sum::<Matrix2<f64>>()
        / (n - 1.0);
    (mean, cov)
}

/// A factor D with D D^T = S for a symmetric positive semidefinite 2 x 2 S.
fn sqrt_psd(s: &Matrix2<f64>) -> Matrix2<f64> {
    let eig = SymmetricEigen::new(*s);
    let mut v = eig.eigenvectors;
    for j in 0..2 {
        let root = eig.eigenvalues[j].max(0.0).sqrt();
        v.column_mut(j).scale_mut(root);
    }
    v
}

/// Builds the data set and draws the four clouds of one-step updates from
/// the start point (see [`IllustrationConfig`]). Fails on batch sizes that
/// are zero, out of order (B_S < B_L <= N is required) or larger than N, on a
/// non-positive step, and on fewer than 2 draws.
pub fn illustrate(config: &IllustrationConfig) -> Result<Illustration, TheoryError> {
    let invalid = |name: &str, value: String, reason: &str| TheoryError::InvalidParameter {
        name: name.into(),
        value,
        reason: reason.into(),
    };
    if config.small_batch == 0 || config.small_batch >= config.large_batch {
        return Err(invalid(
            "small batch",
            config.small_batch.to_string(),
            "need 1 <= small batch < large batch",
        ));
    }
    if config.large_batch > config.examples {
        return Err(invalid(
            "large batch",
            config.large_batch.to_string(),
            "must not exceed the number of examples",
        ));
    }
    if !(config.lr.is_finite() && config.lr > 0.0) {
        return Err(invalid(
            "lr",
            config.lr.to_string(),
            "must be finite and > 0",
        ));
    }
    if config.draws < 2 {
        return Err(invalid(
            "draws",
            config.draws.to_string(),
            "need at least 2",
        ));
    }
    let data = LeastSquares2d::generate(config.examples, config.seed)?;
    let optimum = data.optimum().ok_or_else(|| {
        invalid(
            "examples",
            config.examples.to_string(),
            "the inputs are degenerate (collinear); use more examples",
        )
    })?;
    let hessian = data.hessian();
    let eig = SymmetricEigen::new(hessian);
    // Order the eigenvectors steep first so START_OFFSET reads (steep, shallow).
    let (steep, shallow) = if eig.eigenvalues[0] >= eig.eigenvalues[1] {
        (eig.eigenvectors.column(0), eig.eigenvectors.column(1))
    } else {
        (eig.eigenvectors.column(1), eig.eigenvectors.column(0))
    };
    let start = optimum + steep * START_OFFSET[0] + shallow * START_OFFSET[1];
    let lr = config.lr;
    let n = data.len();
    let full_gradient = data.gradient(&start);
    let fisher = data.fisher(&start);
    let sigma = data.gradient_covariance(&start);
    let (b_s, b_l) = (config.small_batch, config.large_batch);
    let c = 1.0 / b_s as f64 - 1.0 / b_l as f64;
    // Covariance of a minibatch mean without replacement: (1/B)(N-B)/(N-1) Sigma.
    let minibatch_cov = |b: usize| sigma * ((n - b) as f64 / ((n - 1) as f64 * b as f64));
    let isotropic = Matrix2::identity() * (fisher.trace() / 2.0);
    let diagonal = Matrix2::from_diagonal(&fisher.diagonal());
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    // Separate stream so the draws do not reuse the data set's numbers.
    rng.set_stream(1);

    let mut clouds = Vec::with_capacity(4);
    let sgd_points: Vec<Vector2<f64>> = (0..config.draws)
        .map(|_| {
            let batch = index::sample(&mut rng, n, b_s).into_vec();
            start - data.batch_gradient(&batch, &start) * lr
        })
        .collect();
    clouds.push(make_cloud(
        format!("small-batch SGD (B = {b_s})"),
        sgd_points,
        minibatch_cov(b_s) * (lr * lr),
    ));
    for (label, shape) in [
        ("isotropic noise", isotropic),
        ("full-Fisher noise", fisher),
        ("diagonal-Fisher noise", diagonal),
    ] {
        let factor = sqrt_psd(&(shape * c));
        let points: Vec<Vector2<f64>> = (0..config.draws)
            .map(|_| {
                let batch = index::sample(&mut rng, n, b_l).into_vec();
                let xi = Vector2::new(
                    StandardNormal.sample(&mut rng),
                    StandardNormal.sample(&mut rng),
                );
                start - (data.batch_gradient(&batch, &start) + factor * xi) * lr
            })
            .collect();
        clouds.push(make_cloud(
            format!("B = {b_l} + {label}"),
            points,
            (minibatch_cov(b_l) + shape * c) * (lr * lr),
        ));
    }
    Ok(Illustration {
        config: config.clone(),
        start,
        optimum,
        hessian,
        min_loss: data.loss(&optimum),
        full_batch_step: start - full_gradient * lr,
        fisher,
        noise_scale: c,
        clouds,
    })
}

fn make_cloud(label: String, points: Vec<Vector2<f64>>, predicted_cov: Matrix2<f64>) -> Cloud {
    let (mean, cov) = mean_cov(&points);
    Cloud {
        label,
        points,
        mean,
        cov,
        predicted_cov,
    }
}
