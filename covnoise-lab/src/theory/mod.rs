//! Exact theory of noisy gradient descent on a convex quadratic
//! (docs/method.md section 7), with a Monte-Carlo check and the two-dimensional
//! one-step illustration of the paper's Figure 1.
//!
//! The objective is L(theta) = 1/2 e^T A e with e = theta - theta* and A
//! symmetric positive definite. One step of noisy gradient descent with step
//! alpha, heavy-ball momentum beta (0 for plain descent) and noise covariance C
//! is
//!
//! ```text
//! e_{k+1} = e_k - alpha (A e_k + eps_k) + beta (e_k - e_{k-1}),   eps_k ~ N(0, C),
//! ```
//!
//! started at rest (e_{-1} = e_0). Everything here is float64 and uses
//! nalgebra; nothing depends on the neural-network parts of the crate.
//!
//! The expected loss E\[L_k\] is the sum of a deterministic part (the loss of the
//! mean iterate) and a noise part (1/2 tr(A Sigma_k), Sigma_k the covariance of
//! e_k). It is computed in two independent ways that must agree:
//!
//! - [`expected_loss_recursion`] iterates the mean and covariance in the
//!   original coordinates (d x d for plain descent, the 2d x 2d stacked state
//!   for momentum);
//! - [`expected_loss_closed_form`] works in the eigenbasis of A, where the loss
//!   only needs one scalar (plain descent) or one 2 x 2 block (momentum) per
//!   eigenvalue, so any step k costs O(d log k) after one eigendecomposition.
//!
//! [`stationary_loss`] solves the discrete Lyapunov equation for k -> infinity
//! and refuses an unstable step; [`simulate`] runs the dynamics themselves.
//!
//! [`analyze`] puts these together for a set of noise covariances (exact and
//! Monte-Carlo losses, stationary losses, dense curves for a plot, the
//! recursion cross-check), and [`QuadraticReport`] is its JSON document and
//! printed table: `covnoise quadratic` only reads its inputs and writes these.

mod analysis;
mod error;
mod exact;
mod illustration;
mod lyapunov;
mod monte_carlo;
mod problem;
mod summary;

pub use analysis::{
    Analysis, AnalysisSettings, DENSE_GRID_POINTS, DenseCurves, RECURSION_CHECK_BUDGET,
    RecursionCheck, StructureResult, analyze, check_recursion, dense_grid, noises_from_fisher,
};
pub use error::TheoryError;
pub use exact::{
    Dynamics, LossParts, expected_loss_closed_form, expected_loss_recursion, stationary_loss,
    stationary_loss_first_order,
};
pub use illustration::{Cloud, Illustration, IllustrationConfig, LeastSquares2d, illustrate};
pub use lyapunov::solve_discrete_lyapunov;
pub use monte_carlo::{MonteCarlo, simulate};
pub use problem::{Noise, Quadratic, RANDOM_SPD_GENERATOR, STRUCTURES, random_spd, validate_start};
pub use summary::{ProblemSummary, QuadraticReport, monte_carlo_z};
