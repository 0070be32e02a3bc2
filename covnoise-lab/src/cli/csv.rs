//! Reading the numeric CSV files given on the command line (matrices and
//! vectors for `covnoise quadratic`).

use std::path::Path;

use anyhow::{Context, bail};
use nalgebra::{DMatrix, DVector};

/// Reads a CSV file of numbers into rows. One clear error for an unreadable
/// file, a non-number (with line and column), ragged rows, or no numbers.
fn read_csv(path: &Path, what: &str) -> anyhow::Result<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} file {}", path.display()))?;
    let mut rows: Vec<Vec<f64>> = Vec::new();
    let mut first_line = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields: Vec<&str> = line.split(',').map(str::trim).collect();
        // Tolerate one trailing comma, as some writers emit.
        if fields.len() > 1 && fields.last() == Some(&"") {
            fields.pop();
        }
        let mut row = Vec::with_capacity(fields.len());
        for (c, field) in fields.iter().enumerate() {
            let value: f64 = field.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{what} file {}, line {}, column {}: '{}' is not a number",
                    path.display(),
                    n + 1,
                    c + 1,
                    field
                )
            })?;
            row.push(value);
        }
        if let Some(first) = rows.first()
            && first.len() != row.len()
        {
            bail!(
                "{what} file {}: line {} has {} values but line {} has {}",
                path.display(),
                n + 1,
                row.len(),
                first_line + 1,
                first.len()
            );
        }
        if rows.is_empty() {
            first_line = n;
        }
        rows.push(row);
    }
    if rows.is_empty() {
        bail!("{what} file {} has no numbers", path.display());
    }
    Ok(rows)
}

/// Reads a CSV file as a matrix, one row per line (see `read_csv`).
pub fn read_matrix(path: &Path, what: &str) -> anyhow::Result<DMatrix<f64>> {
    let rows = read_csv(path, what)?;
    let (r, c) = (rows.len(), rows[0].len());
    Ok(DMatrix::from_row_iterator(r, c, rows.into_iter().flatten()))
}

/// Reads a CSV file as a vector: all its numbers in order (one line, or one
/// per line).
pub fn read_vector(path: &Path, what: &str) -> anyhow::Result<DVector<f64>> {
    let values: Vec<f64> = read_csv(path, what)?.into_iter().flatten().collect();
    Ok(DVector::from_vec(values))
}
