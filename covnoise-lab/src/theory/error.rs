//! The one error type of the theory module.

use thiserror::Error;

/// Everything that can be wrong with the input of the theory module. Each
/// message is one line that names the offending matrix or parameter, so that
/// the command line can print it as is.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TheoryError {
    /// A matrix that must be square is not.
    #[error("{name} must be square, but it is {rows} x {cols}")]
    NotSquare {
        /// Which matrix (for example "Hessian").
        name: String,
        /// Number of rows.
        rows: usize,
        /// Number of columns.
        cols: usize,
    },
    /// A matrix or vector has no entries.
    #[error("{name} is empty")]
    Empty {
        /// Which matrix or vector.
        name: String,
    },
    /// A matrix or vector holds NaN or an infinity.
    #[error("{name} has a non-finite entry at {position}")]
    NonFinite {
        /// Which matrix or vector.
        name: String,
        /// Where, as "(row, col)" or "\[index\]" (zero-based).
        position: String,
    },
    /// A matrix that must be symmetric is not (beyond rounding).
    #[error(
        "{name} must be symmetric, but entry ({row}, {col}) = {upper} differs from ({col}, {row}) = {lower}"
    )]
    NotSymmetric {
        /// Which matrix.
        name: String,
        /// Row of the worst pair (zero-based).
        row: usize,
        /// Column of the worst pair (zero-based).
        col: usize,
        /// The entry (row, col).
        upper: f64,
        /// The entry (col, row).
        lower: f64,
    },
    /// A matrix that must be positive definite is not.
    #[error(
        "{name} must be positive definite, but its smallest eigenvalue is {min_eigenvalue:.3e} (largest {max_eigenvalue:.3e})"
    )]
    NotPositiveDefinite {
        /// Which matrix.
        name: String,
        /// Its smallest eigenvalue.
        min_eigenvalue: f64,
        /// Its largest eigenvalue.
        max_eigenvalue: f64,
    },
    /// A matrix that must be positive semidefinite (a covariance) is not.
    #[error(
        "{name} must be positive semidefinite, but its smallest eigenvalue is {min_eigenvalue:.3e} (largest {max_eigenvalue:.3e})"
    )]
    NotPositiveSemidefinite {
        /// Which matrix.
        name: String,
        /// Its smallest eigenvalue.
        min_eigenvalue: f64,
        /// Its largest eigenvalue.
        max_eigenvalue: f64,
    },
    /// Two inputs disagree on the dimension.
    #[error("{name} has dimension {got}, but the Hessian has dimension {expected}")]
    DimensionMismatch {
        /// Which input.
        name: String,
        /// The Hessian's dimension d.
        expected: usize,
        /// The input's dimension.
        got: usize,
    },
    /// The step size (and momentum) make the iteration diverge.
    #[error(
        "unstable iteration: alpha = {alpha} with momentum {momentum} gives spectral radius {spectral_radius:.6} >= 1 (alpha * lambda_max = {alpha_lambda_max:.6} must be < 2 (1 + momentum) = {limit})"
    )]
    Unstable {
        /// The step size.
        alpha: f64,
        /// The heavy-ball momentum.
        momentum: f64,
        /// alpha times the largest eigenvalue of A.
        alpha_lambda_max: f64,
        /// Spectral radius of the (stacked) iteration matrix.
        spectral_radius: f64,
        /// The bound 2 (1 + momentum) on alpha * lambda_max.
        limit: f64,
    },
    /// A scalar parameter is out of its range.
    #[error("{name} = {value} is invalid: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: String,
        /// Its value, as given.
        value: String,
        /// What it must satisfy.
        reason: String,
    },
}
