//! Exact expected loss of noisy gradient descent (with or without heavy-ball
//! momentum) on a quadratic: recursion, closed form and stationary value.

use nalgebra::{DMatrix, DVector, Matrix2, Matrix3, Vector2, Vector3};

use super::TheoryError;
use super::problem::{Noise, Quadratic, validate_start};

/// Step size alpha and heavy-ball momentum beta of the iteration
/// e_{k+1} = e_k - alpha (A e_k + eps_k) + beta (e_k - e_{k-1}).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dynamics {
    alpha: f64,
    momentum: f64,
}

impl Dynamics {
    /// Validates alpha (finite, > 0) and the momentum (finite, in [0, 1)).
    /// Stability depends on the Hessian too: see [`Dynamics::check_stable`].
    pub fn new(alpha: f64, momentum: f64) -> Result<Self, TheoryError> {
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(TheoryError::InvalidParameter {
                name: "alpha".into(),
                value: alpha.to_string(),
                reason: "the step size must be finite and > 0".into(),
            });
        }
        if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
            return Err(TheoryError::InvalidParameter {
                name: "momentum".into(),
                value: momentum.to_string(),
                reason: "heavy-ball momentum must be in [0, 1)".into(),
            });
        }
        Ok(Self { alpha, momentum })
    }

    /// The step size alpha.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The heavy-ball momentum beta (0 for plain gradient descent).
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// Spectral radius of the iteration matrix: I - alpha A without momentum,
    /// the 2d x 2d companion matrix [[(1 + beta) I - alpha A, -beta I], [I, 0]]
    /// with momentum. In the eigenbasis of A both split into one 1 x 1 or
    /// 2 x 2 block per eigenvalue, so this is the largest block radius.
    pub fn spectral_radius(&self, quadratic: &Quadratic) -> f64 {
        quadratic
            .eigenvalues()
            .iter()
            .map(|&lambda| mode_radius(self.alpha * lambda, self.momentum))
            .fold(0.0, f64::max)
    }

    /// Fails with [`TheoryError::Unstable`] unless the iteration contracts,
    /// i.e. alpha * lambda_max < 2 (1 + beta). For the 2 x 2 block
    /// z^2 - (1 + beta - x) z + beta with x = alpha lambda > 0 and
    /// 0 <= beta < 1, the Jury conditions reduce to exactly x < 2 (1 + beta);
    /// testing that inequality instead of "radius < 1" avoids calling a
    /// tiny-step iteration unstable because 1 - 1e-17 rounds to 1.
    pub fn check_stable(&self, quadratic: &Quadratic) -> Result<(), TheoryError> {
        let x_max = self.alpha * quadratic.lambda_max();
        let limit = 2.0 * (1.0 + self.momentum);
        if x_max < limit {
            Ok(())
        } else {
            Err(TheoryError::Unstable {
                alpha: self.alpha,
                momentum: self.momentum,
                alpha_lambda_max: x_max,
                spectral_radius: self.spectral_radius(quadratic),
                limit,
            })
        }
    }
}

/// Spectral radius of the 2 x 2 block [[1 + beta - x, -beta], [1, 0]]
/// (x = alpha lambda), whose characteristic polynomial is
/// z^2 - (1 + beta - x) z + beta. With beta = 0 this is |1 - x|.
fn mode_radius(x: f64, beta: f64) -> f64 {
    let a = 1.0 + beta - x;
    let disc = a * a - 4.0 * beta;
    if disc >= 0.0 {
        (a.abs() + disc.sqrt()) / 2.0
    } else {
        // Complex pair: |z|^2 = product of the roots = beta.
        beta.sqrt()
    }
}

/// The expected loss E\[L_k\] split into the loss of the mean iterate and the
/// contribution of the noise, 1/2 tr(A Cov\[e_k\]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossParts {
    /// 1/2 m_k^T A m_k with m_k = E\[e_k\]: what noiseless descent would reach.
    pub deterministic: f64,
    /// 1/2 tr(A Sigma_k): the cost of the noise.
    pub noise: f64,
}

impl LossParts {
    /// E\[L_k\] = deterministic + noise.
    pub fn total(&self) -> f64 {
        self.deterministic + self.noise
    }
}

/// Checks the inputs shared by every exact and Monte-Carlo function.
pub(crate) fn check_inputs(
    quadratic: &Quadratic,
    noise: &Noise,
    e0: &DVector<f64>,
) -> Result<(), TheoryError> {
    noise.check_dim(quadratic)?;
    validate_start(quadratic, e0)
}

/// Sorted, de-duplicated copy of `steps`, and for each requested step its
/// index in that copy, so that results come back in the caller's order.
pub(crate) fn unique_steps(steps: &[u64]) -> (Vec<u64>, Vec<usize>) {
    let mut unique = steps.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let index = steps
        .iter()
        .map(|k| {
            unique
                .binary_search(k)
                .expect("every step is in its own sorted copy")
        })
        .collect();
    (unique, index)
}

/// E\[L_k\] at each k in `steps` (any order, repeats allowed) by iterating the
/// mean and covariance in the original coordinates:
///
/// - plain descent: m_{k+1} = M m_k, Sigma_{k+1} = M Sigma_k M + alpha^2 C,
///   M = I - alpha A;
/// - momentum: the same for the stacked state z_k = (e_k, e_{k-1}) with the
///   2d x 2d matrix T = [[(1 + beta) I - alpha A, -beta I], [I, 0]] and noise
///   alpha^2 [[C, 0], [0, 0]], started at rest (e_{-1} = e_0, Sigma_0 = 0).
///
/// Costs O(max k * d^3); it is the reference that
/// [`expected_loss_closed_form`] is tested against. Stability is not
/// required: an unstable iteration gives growing (eventually infinite) losses.
pub fn expected_loss_recursion(
    quadratic: &Quadratic,
    noise: &Noise,
    e0: &DVector<f64>,
    dynamics: Dynamics,
    steps: &[u64],
) -> Result<Vec<LossParts>, TheoryError> {
    check_inputs(quadratic, noise, e0)?;
    let (unique, index) = unique_steps(steps);
    let d = quadratic.dim();
    let a = quadratic.hessian();
    let alpha = dynamics.alpha;
    let beta = dynamics.momentum;
    let mut found = Vec::with_capacity(unique.len());

    // The state is e_k alone without momentum, (e_k, e_{k-1}) with it; the
    // loss reads the leading d x d block either way.
    let n = if beta == 0.0 { d } else { 2 * d };
    let mut t = DMatrix::<f64>::zeros(n, n);
    t.view_mut((0, 0), (d, d))
        .copy_from(&(DMatrix::identity(d, d) * (1.0 + beta) - a * alpha));
    if beta != 0.0 {
        t.view_mut((0, d), (d, d))
            .copy_from(&(DMatrix::identity(d, d) * -beta));
        t.view_mut((d, 0), (d, d)).fill_with_identity();
    }
    let mut q = DMatrix::<f64>::zeros(n, n);
    q.view_mut((0, 0), (d, d))
        .copy_from(&(noise.cov() * (alpha * alpha)));
    let mut mean = DVector::<f64>::zeros(n);
    mean.rows_mut(0, d).copy_from(e0);
    if beta != 0.0 {
        mean.rows_mut(d, d).copy_from(e0);
    }
    let t_tr = t.transpose();
    let mut cov = DMatrix::<f64>::zeros(n, n);
    let mut work = DMatrix::<f64>::zeros(n, n);

    let mut k = 0u64;
    for &target in &unique {
        while k < target {
            mean = &t * &mean;
            work.gemm(1.0, &t, &cov, 0.0);
            cov.gemm(1.0, &work, &t_tr, 0.0);
            cov += &q;
            k += 1;
        }
        let m = mean.rows(0, d);
        let deterministic = 0.5 * m.dot(&(a * m));
        let noise_part = 0.5 * a.component_mul(&cov.view((0, 0), (d, d))).sum();
        found.push(LossParts {
            deterministic,
            noise: noise_part,
        });
    }
    Ok(index.into_iter().map(|i| found[i]).collect())
}

/// Per-eigenvalue data the closed forms need: lambda_i, the start point's
/// coordinate (v_i^T e_0) and the noise variance along v_i (v_i^T C v_i).
/// Only these diagonal entries matter because the loss 1/2 tr(A Sigma) reads
/// only the diagonal of Sigma in the eigenbasis of A, and each diagonal entry
/// (or 2 x 2 block, with momentum) evolves on its own.
struct Modes {
    lambda: Vec<f64>,
    start: Vec<f64>,
    noise_var: Vec<f64>,
}

fn modes(quadratic: &Quadratic, noise: &Noise, e0: &DVector<f64>) -> Modes {
    let v = quadratic.eigenvectors();
    let cv = noise.cov() * v;
    let start = v.tr_mul(e0);
    Modes {
        lambda: quadratic.eigenvalues().iter().copied().collect(),
        start: start.iter().copied().collect(),
        noise_var: (0..v.ncols())
            .map(|i| v.column(i).dot(&cv.column(i)))
            .collect(),
    }
}

/// sum_{j<k} r^j for r = exp(ln_r) >= 0, with ln r and 1 - r passed in
/// exactly so that slow modes (r just below 1) lose no digits to
/// cancellation.
fn geometric_sum(ln_r: f64, one_minus_r: f64, k: u64) -> f64 {
    if k == 0 {
        return 0.0;
    }
    if one_minus_r == 0.0 {
        return k as f64;
    }
    // 1 - r^k = -expm1(k ln r), accurate even when k ln r is tiny; r = 0
    // (ln r = -inf) gives 1.
    -(k as f64 * ln_r).exp_m1() / one_minus_r
}

/// E\[L_k\] at each k in `steps` (any order, repeats allowed) in closed form,
/// in the eigenbasis of A (eigenpairs lambda_i, v_i; x_i = alpha lambda_i).
///
/// Plain descent (docs/method.md section 7), with mu_i = 1 - x_i:
///
/// ```text
/// deterministic = 1/2 sum_i lambda_i mu_i^{2k} (v_i^T e_0)^2
/// noise         = (alpha/2) sum_i (v_i^T C v_i) (1 - mu_i^{2k}) / (2 - x_i)
///               = (alpha/2) tr((2I - alpha A)^{-1} (I - M^{2k}) C)
/// ```
///
/// Momentum: each eigen-direction is a 2 x 2 block T_i = [[1 + beta - x_i,
/// -beta], [1, 0]] acting on (e_k, e_{k-1}); the mean is T_i^k (1, 1) v_i^T e_0
/// and the block's covariance (p, q, r) follows the linear map
/// K_i = [[a^2, -2 a beta, beta^2], [a, -beta, 0], [1, 0, 0]] (a = 1 + beta - x_i)
/// plus alpha^2 v_i^T C v_i in p, so p_k = alpha^2 (v_i^T C v_i) [sum_{j<k} K_i^j]_{11}.
/// Powers and geometric sums are taken by repeated squaring, O(log k) per
/// mode, without inverting I - K_i (which is nearly singular for slow modes).
///
/// Like the recursion, this does not require stability.
pub fn expected_loss_closed_form(
    quadratic: &Quadratic,
    noise: &Noise,
    e0: &DVector<f64>,
    dynamics: Dynamics,
    steps: &[u64],
) -> Result<Vec<LossParts>, TheoryError> {
    check_inputs(quadratic, noise, e0)?;
    let modes = modes(quadratic, noise, e0);
    let alpha = dynamics.alpha;
    let beta = dynamics.momentum;
    Ok(steps
        .iter()
        .map(|&k| {
            let mut parts = LossParts {
                deterministic: 0.0,
                noise: 0.0,
            };
            for i in 0..modes.lambda.len() {
                let lambda = modes.lambda[i];
                let x = alpha * lambda;
                let (det, unit_noise) = if beta == 0.0 {
                    mode_plain(x, k)
                } else {
                    mode_momentum(x, beta, k)
                };
                parts.deterministic += 0.5 * lambda * det * modes.start[i] * modes.start[i];
                parts.noise += 0.5 * lambda * alpha * alpha * modes.noise_var[i] * unit_noise;
            }
            parts
        })
        .collect())
}

/// For one eigen-direction without momentum: (mu^{2k}, sum_{j<k} mu^{2j}),
/// the squared decay of the mean and the variance added by unit noise
/// variance at unit step.
fn mode_plain(x: f64, k: u64) -> (f64, f64) {
    // ln mu^2 = 2 ln|1 - x|, via ln_1p for x < 1: forming mu^2 first and
    // taking its log would lose half the digits of a slow mode (x ~ 1e-8).
    let ln_r = if x < 1.0 {
        2.0 * (-x).ln_1p()
    } else {
        2.0 * (x - 1.0).ln()
    };
    // 1 - mu^2 = x (2 - x) exactly, without cancelling when x is tiny.
    let one_minus_r = x * (2.0 - x);
    let decay = if k == 0 { 1.0 } else { (k as f64 * ln_r).exp() };
    (decay, geometric_sum(ln_r, one_minus_r, k))
}

/// The linear map K taking one eigen-direction's second moments
/// (E[e_k^2], E[e_k e_{k-1}], E[e_{k-1}^2]) one heavy-ball step forward,
/// for x = alpha * lambda: the state moves by T = [[1 + beta - x, -beta], [1, 0]].
fn momentum_covariance_map(x: f64, beta: f64) -> Matrix3<f64> {
    let a = 1.0 + beta - x;
    Matrix3::new(
        a * a,
        -2.0 * a * beta,
        beta * beta,
        a,
        -beta,
        0.0,
        1.0,
        0.0,
        0.0,
    )
}

/// For one eigen-direction with momentum: ((T^k (1, 1))_1^2,
/// [sum_{j<k} K^j]_{11}), the analogues of [`mode_plain`].
fn mode_momentum(x: f64, beta: f64, k: u64) -> (f64, f64) {
    let a = 1.0 + beta - x;
    let t = Matrix2::new(a, -beta, 1.0, 0.0);
    let mean = matrix2_pow(&t, k) * Vector2::new(1.0, 1.0);
    let kmat = momentum_covariance_map(x, beta);
    let (_, sum) = power_and_geometric_sum(&kmat, k);
    (mean[0] * mean[0], sum[(0, 0)])
}

/// T^k by repeated squaring.
fn matrix2_pow(t: &Matrix2<f64>, k: u64) -> Matrix2<f64> {
    let mut result = Matrix2::identity();
    let mut base = *t;
    let mut e = k;
    while e > 0 {
        if e & 1 == 1 {
            result *= base;
        }
        base *= base;
        e >>= 1;
    }
    result
}

/// (K^k, sum_{j<k} K^j) by binary doubling from the most significant bit:
/// doubling n -> 2n gives (P^2, G + P G), incrementing n -> n + 1 gives
/// (K P, I + K G).
fn power_and_geometric_sum(kmat: &Matrix3<f64>, k: u64) -> (Matrix3<f64>, Matrix3<f64>) {
    let mut p = Matrix3::identity();
    let mut g = Matrix3::zeros();
    if k == 0 {
        return (p, g);
    }
    let bits = 64 - k.leading_zeros();
    for bit in (0..bits).rev() {
        g += p * g;
        p *= p;
        if (k >> bit) & 1 == 1 {
            g = Matrix3::identity() + kmat * g;
            p = kmat * p;
        }
    }
    (p, g)
}

/// The stationary expected loss lim_{k -> infinity} E\[L_k\]; the deterministic
/// part vanishes, so this is the noise part 1/2 tr(A Sigma_inf), where
/// Sigma_inf solves the discrete Lyapunov equation
/// Sigma = T Sigma T^T + alpha^2 [[C, 0], [0, 0]].
///
/// In the eigenbasis of A the equation splits into one scalar (plain descent)
/// or one 3-unknown block (momentum) per eigenvalue. Without momentum this
/// gives (alpha/2) tr((2I - alpha A)^{-1} C). Fails with
/// [`TheoryError::Unstable`] when no stationary distribution exists.
pub fn stationary_loss(
    quadratic: &Quadratic,
    noise: &Noise,
    dynamics: Dynamics,
) -> Result<f64, TheoryError> {
    noise.check_dim(quadratic)?;
    dynamics.check_stable(quadratic)?;
    let zero = DVector::zeros(quadratic.dim());
    let modes = modes(quadratic, noise, &zero);
    let alpha = dynamics.alpha;
    let beta = dynamics.momentum;
    let mut total = 0.0;
    for i in 0..modes.lambda.len() {
        let lambda = modes.lambda[i];
        let x = alpha * lambda;
        let unit = if beta == 0.0 {
            // p = mu^2 p + 1  =>  p = 1 / (1 - mu^2) = 1 / (x (2 - x)).
            1.0 / (x * (2.0 - x))
        } else {
            // (I - K) s = e_1 for s = (p, q, r), the block's stationary
            // covariance per unit injected variance. Stability makes I - K
            // invertible (K's eigenvalues are products of T's, all inside the
            // unit circle).
            let kmat = momentum_covariance_map(x, beta);
            let lu = (Matrix3::identity() - kmat).lu();
            match lu.solve(&Vector3::new(1.0, 0.0, 0.0)) {
                Some(s) => s[0],
                None => {
                    return Err(TheoryError::Unstable {
                        alpha,
                        momentum: beta,
                        alpha_lambda_max: alpha * quadratic.lambda_max(),
                        spectral_radius: dynamics.spectral_radius(quadratic),
                        limit: 2.0 * (1.0 + beta),
                    });
                }
            }
        };
        total += 0.5 * lambda * alpha * alpha * modes.noise_var[i] * unit;
    }
    Ok(total)
}

/// The first-order (small alpha) approximation of [`stationary_loss`]:
/// alpha tr(C) / (4 (1 - beta)). It depends on C only through its trace,
/// which is why noises of equal total variance end at the same loss.
pub fn stationary_loss_first_order(noise: &Noise, dynamics: Dynamics) -> f64 {
    dynamics.alpha * noise.trace() / (4.0 * (1.0 - dynamics.momentum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn momentum_path_with_zero_beta_matches_plain_formula() {
        // Same quantity by two code paths (matrix powers versus expm1); both
        // are accurate to ~1e-14 relative for these moderate x and k.
        for &x in &[1e-3, 0.3, 1.0, 1.7] {
            for &k in &[0u64, 1, 2, 7, 100, 5000] {
                let (d1, n1) = mode_plain(x, k);
                let (d2, n2) = mode_momentum(x, 0.0, k);
                assert!((d1 - d2).abs() <= 1e-12 * d1.abs().max(1e-300), "{x} {k}");
                assert!((n1 - n2).abs() <= 1e-12 * n1.abs().max(1e-300), "{x} {k}");
            }
        }
    }

    #[test]
    fn geometric_sum_small_cases() {
        // Exact small sums: 1 + r + r^2 with r = 0.25.
        assert!((geometric_sum(0.25f64.ln(), 0.75, 3) - 1.3125).abs() < 1e-15);
        assert_eq!(geometric_sum(0.0, 0.0, 5), 5.0);
        assert_eq!(geometric_sum(f64::NEG_INFINITY, 1.0, 5), 1.0);
    }

    #[test]
    fn mode_radius_matches_known_cases() {
        // Exact arithmetic cases: |1 - x| without momentum, sqrt(beta) for
        // complex roots (x = 1, beta = 0.5: a = 0.5, disc < 0).
        assert_eq!(mode_radius(0.5, 0.0), 0.5);
        assert!((mode_radius(1.0, 0.5) - 0.5f64.sqrt()).abs() < 1e-15);
    }
}
