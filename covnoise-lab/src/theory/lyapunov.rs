//! A dense discrete Lyapunov solver, kept as an independent reference for the
//! eigenbasis solve inside [`super::stationary_loss`].

use nalgebra::DMatrix;

use super::TheoryError;

/// Largest n accepted: the Kronecker system has n^2 unknowns and its LU costs
/// O(n^6), about a second at n = 40.
const MAX_DENSE_LYAPUNOV: usize = 40;

/// Solves X = T X T^T + Q for X by vectorizing:
/// (I - T (x) T) vec(X) = vec(Q). Dense and O(n^6), so only for n up to 40;
/// meant as a reference (for example on the 2d x 2d stacked momentum state of
/// a small problem). Fails when T or Q is not square, their sizes differ, n is
/// too large, or I - T (x) T is singular (some product of two eigenvalues of
/// T equals 1, so no stationary covariance exists).
pub fn solve_discrete_lyapunov(
    t: &DMatrix<f64>,
    q: &DMatrix<f64>,
) -> Result<DMatrix<f64>, TheoryError> {
    for (name, m) in [("iteration matrix T", t), ("injected covariance Q", q)] {
        if m.nrows() != m.ncols() {
            return Err(TheoryError::NotSquare {
                name: name.into(),
                rows: m.nrows(),
                cols: m.ncols(),
            });
        }
    }
    let n = t.nrows();
    if q.nrows() != n {
        return Err(TheoryError::DimensionMismatch {
            name: "injected covariance Q".into(),
            expected: n,
            got: q.nrows(),
        });
    }
    if n == 0 || n > MAX_DENSE_LYAPUNOV {
        return Err(TheoryError::InvalidParameter {
            name: "Lyapunov dimension".into(),
            value: n.to_string(),
            reason: format!("the dense solver takes 1 to {MAX_DENSE_LYAPUNOV}"),
        });
    }
    // nalgebra stores column-major, so vec(T X T^T) = (T (x) T) vec(X).
    let system = DMatrix::<f64>::identity(n * n, n * n) - t.kronecker(t);
    let rhs = DMatrix::from_column_slice(n * n, 1, q.as_slice());
    let solution = system
        .lu()
        .solve(&rhs)
        .ok_or_else(|| TheoryError::InvalidParameter {
            name: "iteration matrix T".into(),
            value: format!("{n} x {n}"),
            reason: "I - T (x) T is singular, so no stationary covariance exists".into(),
        })?;
    Ok(DMatrix::from_column_slice(n, n, solution.as_slice()))
}
