//! The quadratic problem, the noise covariances built from a Fisher matrix,
//! input validation, and the seeded random problem generator.

use covnoise::noise::StructureName;
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::TheoryError;

/// Entries (i, j) and (j, i) may differ by this much, relative to the largest
/// entry, and still count as symmetric. Matrices often come from files written
/// by other programs (possibly computed in float32), whose rounding leaves
/// asymmetry around 1e-7; a real mistake (a transposed block, a wrong file) is
/// far larger. Accepted matrices are symmetrized before use.
const SYMMETRY_TOLERANCE: f64 = 1e-6;

/// A covariance's smallest eigenvalue may be this negative, relative to its
/// largest, and still count as positive semidefinite: the eigensolver's
/// rounding on a singular covariance (for example diag(F) with a zero entry)
/// is about d * 1e-16 of the largest eigenvalue.
const PSD_TOLERANCE: f64 = 1e-10;

/// A Hessian whose eigenvalues span more than this ratio is treated as
/// singular: at condition 1e13 the smallest eigenvalue is below the rounding
/// error of the eigensolver on the largest, so its sign is not meaningful.
const MIN_RELATIVE_EIGENVALUE: f64 = 1e-13;

/// Largest dimension accepted by [`random_spd`]: every object here is a dense
/// d x d matrix, and the Monte-Carlo cost grows as d^2 per step per run.
const MAX_GENERATED_DIM: usize = 4096;

/// ChaCha stream of the random problem generator. Monte-Carlo runs use
/// streams 0, 1, 2, ..., so the generator stays independent of them even when
/// both are seeded with the same `--seed`.
const GENERATOR_STREAM: u64 = u64::MAX;

/// One-line description of what [`random_spd`] generates, for reports.
pub const RANDOM_SPD_GENERATOR: &str = "A = Q diag(lambda) Q^T with Q a Haar-random orthogonal matrix (QR of a Gaussian matrix, ChaCha8 seeded) and lambda geometric from 1 down to 1/condition; the random rotation gives the Fisher (= A by default) strong off-diagonal structure, so full and diagonal noise differ";

/// Checks that `m` is non-empty, square and finite.
fn check_square_finite(name: &str, m: &DMatrix<f64>) -> Result<(), TheoryError> {
    if m.nrows() == 0 || m.ncols() == 0 {
        return Err(TheoryError::Empty { name: name.into() });
    }
    if m.nrows() != m.ncols() {
        return Err(TheoryError::NotSquare {
            name: name.into(),
            rows: m.nrows(),
            cols: m.ncols(),
        });
    }
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            if !m[(i, j)].is_finite() {
                return Err(TheoryError::NonFinite {
                    name: name.into(),
                    position: format!("({i}, {j})"),
                });
            }
        }
    }
    Ok(())
}

/// Checks that `m` is square, finite and symmetric up to
/// [`SYMMETRY_TOLERANCE`], and returns its symmetric part.
fn symmetrized(name: &str, m: &DMatrix<f64>) -> Result<DMatrix<f64>, TheoryError> {
    check_square_finite(name, m)?;
    let scale = m.amax();
    let mut worst: Option<(usize, usize, f64)> = None;
    for j in 0..m.ncols() {
        for i in 0..j {
            let gap = (m[(i, j)] - m[(j, i)]).abs();
            if gap > SYMMETRY_TOLERANCE * scale && worst.is_none_or(|(_, _, g)| gap > g) {
                worst = Some((i, j, gap));
            }
        }
    }
    if let Some((row, col, _)) = worst {
        return Err(TheoryError::NotSymmetric {
            name: name.into(),
            row,
            col,
            upper: m[(row, col)],
            lower: m[(col, row)],
        });
    }
    Ok((m + m.transpose()) * 0.5)
}

/// Eigendecomposition of a symmetric matrix with the eigenvalues in
/// ascending order and the eigenvectors (columns) permuted to match.
pub(crate) fn sorted_eigen(m: &DMatrix<f64>) -> (DVector<f64>, DMatrix<f64>) {
    let eig = SymmetricEigen::new(m.clone());
    let n = eig.eigenvalues.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[a].total_cmp(&eig.eigenvalues[b]));
    let values = DVector::from_iterator(n, order.iter().map(|&i| eig.eigenvalues[i]));
    let mut vectors = DMatrix::zeros(n, n);
    for (dst, &src) in order.iter().enumerate() {
        vectors.set_column(dst, &eig.eigenvectors.column(src));
    }
    (values, vectors)
}

/// Checks that a covariance-like matrix is symmetric positive semidefinite and
/// returns its symmetric part.
fn checked_psd(name: &str, m: &DMatrix<f64>) -> Result<DMatrix<f64>, TheoryError> {
    let sym = symmetrized(name, m)?;
    let (values, _) = sorted_eigen(&sym);
    let min = values[0];
    let max = values[values.len() - 1];
    if min < -PSD_TOLERANCE * max.abs().max(min.abs()) {
        return Err(TheoryError::NotPositiveSemidefinite {
            name: name.into(),
            min_eigenvalue: min,
            max_eigenvalue: max,
        });
    }
    Ok(sym)
}

/// The objective L(e) = 1/2 e^T A e: a validated symmetric positive definite
/// Hessian A with its eigendecomposition (eigenvalues ascending), which the
/// closed forms and the stability check use.
#[derive(Debug, Clone)]
pub struct Quadratic {
    hessian: DMatrix<f64>,
    eigenvalues: DVector<f64>,
    eigenvectors: DMatrix<f64>,
}

impl Quadratic {
    /// Validates `hessian` (non-empty, square, finite, symmetric, positive
    /// definite) and decomposes it.
    pub fn new(hessian: &DMatrix<f64>) -> Result<Self, TheoryError> {
        let name = "Hessian";
        let hessian = symmetrized(name, hessian)?;
        let (eigenvalues, eigenvectors) = sorted_eigen(&hessian);
        let min = eigenvalues[0];
        let max = eigenvalues[eigenvalues.len() - 1];
        if min <= 0.0 || min <= MIN_RELATIVE_EIGENVALUE * max {
            return Err(TheoryError::NotPositiveDefinite {
                name: name.into(),
                min_eigenvalue: min,
                max_eigenvalue: max,
            });
        }
        Ok(Self {
            hessian,
            eigenvalues,
            eigenvectors,
        })
    }

    /// The dimension d.
    pub fn dim(&self) -> usize {
        self.hessian.nrows()
    }

    /// The (symmetrized) Hessian A.
    pub fn hessian(&self) -> &DMatrix<f64> {
        &self.hessian
    }

    /// Eigenvalues of A, ascending.
    pub fn eigenvalues(&self) -> &DVector<f64> {
        &self.eigenvalues
    }

    /// Orthonormal eigenvectors of A as columns, in the order of
    /// [`Quadratic::eigenvalues`].
    pub fn eigenvectors(&self) -> &DMatrix<f64> {
        &self.eigenvectors
    }

    /// Smallest eigenvalue of A.
    pub fn lambda_min(&self) -> f64 {
        self.eigenvalues[0]
    }

    /// Largest eigenvalue of A.
    pub fn lambda_max(&self) -> f64 {
        self.eigenvalues[self.eigenvalues.len() - 1]
    }

    /// Condition number lambda_max / lambda_min.
    pub fn condition(&self) -> f64 {
        self.lambda_max() / self.lambda_min()
    }

    /// The loss 1/2 e^T A e at error e (length must be d; not checked here).
    pub fn loss(&self, e: &DVector<f64>) -> f64 {
        0.5 * e.dot(&(&self.hessian * e))
    }
}

/// Checks that a start point e_0 = theta_0 - theta* has d finite entries.
pub fn validate_start(quadratic: &Quadratic, e0: &DVector<f64>) -> Result<(), TheoryError> {
    let name = "start point x0";
    if e0.len() != quadratic.dim() {
        return Err(TheoryError::DimensionMismatch {
            name: name.into(),
            expected: quadratic.dim(),
            got: e0.len(),
        });
    }
    if let Some(i) = e0.iter().position(|v| !v.is_finite()) {
        return Err(TheoryError::NonFinite {
            name: name.into(),
            position: format!("[{i}]"),
        });
    }
    Ok(())
}

/// The structures whose covariance the quadratic model compares, in the
/// order reports list them: the library's own names ([`StructureName`]),
/// each building its covariance from a Fisher matrix F (docs/method.md
/// section 3) with the same trace c tr(F). `none` (C = 0) is accepted by
/// [`Noise::from_fisher`] too.
pub const STRUCTURES: [StructureName; 3] = [
    StructureName::Full,
    StructureName::Diag,
    StructureName::Isotropic,
];

/// A validated noise covariance C (symmetric positive semidefinite) with a
/// label for reports.
#[derive(Debug, Clone)]
pub struct Noise {
    label: String,
    cov: DMatrix<f64>,
}

impl Noise {
    /// Builds C = scale * S from a Fisher matrix F, with S = F, diag(F),
    /// (tr F / d) I or 0 (F for bernoulli and subset noise, whose covariance
    /// is c F). F must be symmetric positive semidefinite and `scale`
    /// finite and non-negative.
    pub fn from_fisher(
        fisher: &DMatrix<f64>,
        structure: StructureName,
        scale: f64,
    ) -> Result<Self, TheoryError> {
        check_scale(scale)?;
        let fisher = checked_psd("Fisher", fisher)?;
        let d = fisher.nrows();
        let shape = match structure {
            StructureName::Full => fisher,
            StructureName::Diag => DMatrix::from_diagonal(&fisher.diagonal()),
            StructureName::Isotropic => DMatrix::identity(d, d) * (fisher.trace() / d as f64),
            StructureName::None => DMatrix::zeros(d, d),
            // Reweighting noises whose covariance is c F (their shape is
            // not Gaussian; the expected loss sees only the covariance).
            StructureName::Bernoulli | StructureName::Subset => fisher,
            StructureName::Constant => {
                return Err(TheoryError::InvalidParameter {
                    name: "noise structure".into(),
                    value: "constant".into(),
                    reason: "constant noise is c v I, not made from a Fisher matrix: give its covariance with Noise::from_covariance".into(),
                });
            }
        };
        Ok(Self {
            label: structure.as_str().into(),
            cov: shape * scale,
        })
    }

    /// Uses a given covariance C (validated: square, finite, symmetric,
    /// positive semidefinite). `label` names it in reports and errors.
    pub fn from_covariance(label: &str, cov: &DMatrix<f64>) -> Result<Self, TheoryError> {
        let cov = checked_psd(label, cov)?;
        Ok(Self {
            label: label.into(),
            cov,
        })
    }

    /// No noise (C = 0) in dimension d: plain (or momentum) gradient descent.
    pub fn zero(dim: usize) -> Self {
        Self {
            label: "none".into(),
            cov: DMatrix::zeros(dim, dim),
        }
    }

    /// The label given at construction ("full", "diag", "isotropic", ...).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The covariance C.
    pub fn cov(&self) -> &DMatrix<f64> {
        &self.cov
    }

    /// The dimension d of C.
    pub fn dim(&self) -> usize {
        self.cov.nrows()
    }

    /// Returns C multiplied by `scale` (finite, non-negative).
    pub fn scaled(&self, scale: f64) -> Result<Self, TheoryError> {
        check_scale(scale)?;
        Ok(Self {
            label: self.label.clone(),
            cov: &self.cov * scale,
        })
    }

    /// tr C: the total variance, which alone sets the stationary loss to
    /// first order in alpha.
    pub fn trace(&self) -> f64 {
        self.cov.trace()
    }

    /// ||C||_F, the Frobenius norm.
    pub fn frobenius(&self) -> f64 {
        self.cov.norm()
    }

    /// tr(A C), which sets the early-training noise loss (alpha^2 k / 2) tr(A C).
    /// With A = F this is ||C||_F^2 / c for all three structures.
    pub fn tr_hc(&self, quadratic: &Quadratic) -> Result<f64, TheoryError> {
        self.check_dim(quadratic)?;
        // Both are symmetric, so tr(A C) is the sum of the elementwise product.
        Ok(quadratic.hessian().component_mul(&self.cov).sum())
    }

    /// Checks that C has the Hessian's dimension.
    pub(crate) fn check_dim(&self, quadratic: &Quadratic) -> Result<(), TheoryError> {
        if self.dim() != quadratic.dim() {
            return Err(TheoryError::DimensionMismatch {
                name: format!("noise covariance ({})", self.label),
                expected: quadratic.dim(),
                got: self.dim(),
            });
        }
        Ok(())
    }
}

fn check_scale(scale: f64) -> Result<(), TheoryError> {
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(TheoryError::InvalidParameter {
            name: "scale".into(),
            value: scale.to_string(),
            reason: "must be finite and >= 0".into(),
        });
    }
    Ok(())
}

/// A random symmetric positive definite d x d matrix with condition number
/// `condition`, reproducible from `seed`; see [`RANDOM_SPD_GENERATOR`].
///
/// The eigenvalues are geometric from 1 (the largest) down to 1/condition, so
/// alpha = 1 is always a stable step. The eigenvectors are Haar-random: for
/// large d the diagonal of A is then close to tr(A)/d while ||A||_F^2 = sum of
/// lambda_i^2 is much larger than sum of A_ii^2, which is exactly the regime
/// where full- and diagonal-Fisher noise differ.
pub fn random_spd(dim: usize, condition: f64, seed: u64) -> Result<DMatrix<f64>, TheoryError> {
    if dim == 0 || dim > MAX_GENERATED_DIM {
        return Err(TheoryError::InvalidParameter {
            name: "dim".into(),
            value: dim.to_string(),
            reason: format!("must be between 1 and {MAX_GENERATED_DIM}"),
        });
    }
    if !(condition.is_finite() && condition >= 1.0) {
        return Err(TheoryError::InvalidParameter {
            name: "condition".into(),
            value: condition.to_string(),
            reason: "must be finite and >= 1".into(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(GENERATOR_STREAM);
    let gaussian = DMatrix::from_fn(dim, dim, |_, _| -> f64 { StandardNormal.sample(&mut rng) });
    // QR of a Gaussian matrix is Haar-distributed once the signs of R's
    // diagonal are moved into Q (otherwise the distribution depends on the
    // QR implementation's sign convention).
    let qr = gaussian.qr();
    let mut q = qr.q();
    let r = qr.r();
    for j in 0..dim {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    let spectrum = DVector::from_fn(dim, |i, _| {
        if dim == 1 {
            1.0
        } else {
            condition.powf(-(i as f64) / (dim - 1) as f64)
        }
    });
    let a = &q * DMatrix::from_diagonal(&spectrum) * q.transpose();
    // Rounding leaves A asymmetric by ~1e-16; make it exactly symmetric.
    Ok((&a + a.transpose()) * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_spd_has_the_requested_spectrum() {
        let a = random_spd(12, 50.0, 3).unwrap();
        let q = Quadratic::new(&a).unwrap();
        // The eigensolver is backward stable: eigenvalues of a matrix with
        // norm 1 come back to ~1e-15; 1e-12 leaves room for d = 12.
        assert!((q.lambda_max() - 1.0).abs() < 1e-12);
        assert!((q.condition() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn structures_share_the_trace() {
        let f = random_spd(6, 10.0, 1).unwrap();
        let traces: Vec<f64> = STRUCTURES
            .iter()
            .map(|&s| Noise::from_fisher(&f, s, 0.5).unwrap().trace())
            .collect();
        // Traces are sums of the same d numbers (or d copies of their mean):
        // equal up to a few ulps.
        assert!((traces[0] - traces[1]).abs() < 1e-12);
        assert!((traces[0] - traces[2]).abs() < 1e-12);
    }
}
