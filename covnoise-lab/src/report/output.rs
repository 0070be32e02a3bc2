//! What every plot shares: the output format chosen by the file extension,
//! checks before drawing, one-line drawing errors, and the backend dispatch.

use std::path::Path;

use anyhow::{anyhow, bail};

/// Output format, from the file extension.
#[derive(Clone, Copy)]
pub(crate) enum Format {
    /// Bitmap.
    Png,
    /// Vector.
    Svg,
}

/// The format of `path`: `.png` or `.svg`, else an error naming the file.
pub(crate) fn format_of(path: &Path) -> anyhow::Result<Format> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("png") => Ok(Format::Png),
        Some("svg") => Ok(Format::Svg),
        _ => bail!("plot file {} must end in .png or .svg", path.display()),
    }
}

/// Checks the output before any drawing: an existing parent directory (the
/// backends' own error for a missing directory does not say which), and a
/// registered font (without one, plotters fails on the first text with
/// "FontUnavailable", for SVG as for PNG).
pub(crate) fn prepare_output(path: &Path) -> anyhow::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.is_dir()
    {
        bail!(
            "cannot write plot {}: directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    crate::report::font::ensure_fonts()
}

/// plotters' errors carry the backend's error; keep the message, one line.
pub(crate) fn drawing_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{}", e.to_string().replace('\n', " "))
}

/// Draws with `$draw(root)` on the backend `$format` selects, and names the
/// file in any error. A macro because the drawing functions are generic over
/// the backend and closures cannot be.
macro_rules! render {
    ($path:expr, $format:expr, $size:expr, $draw:expr) => {{
        let path: &std::path::Path = $path;
        let result = match $format {
            $crate::report::output::Format::Png => {
                $draw(plotters::prelude::BitMapBackend::new(path, $size).into_drawing_area())
            }
            $crate::report::output::Format::Svg => {
                $draw(plotters::prelude::SVGBackend::new(path, $size).into_drawing_area())
            }
        };
        result.map_err(|e| anyhow::anyhow!("cannot write plot {}: {e}", path.display()))
    }};
}
pub(crate) use render;
