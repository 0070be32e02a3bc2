//! Font loading for PNG plots.
//!
//! plotters draws text into bitmaps through `ab_glyph`, which needs a TrueType
//! font registered at run time. We use the system's DejaVu Sans (Debian package
//! `fonts-dejavu-core`) rather than bundling a font into the binary. SVG output
//! needs it too: plotters measures text with the font to lay out labels.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Where we look for a sans-serif TrueType font, in order, after the
/// `COVNOISE_FONT` environment variable.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers a sans-serif font with plotters so that plots (PNG and SVG) can
/// draw text. Idempotent; returns a one-line error naming what to install if
/// no font is found.
pub fn ensure_fonts() -> anyhow::Result<()> {
    let result = REGISTERED.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(path) = std::env::var_os("COVNOISE_FONT") {
            candidates.push(PathBuf::from(path));
        }
        candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps a 'static reference to the font data; the font
                // is loaded once per process, so leaking it is bounded.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                for family in ["sans-serif", "serif", "monospace"] {
                    plotters::style::register_font(
                        family,
                        plotters::style::FontStyle::Normal,
                        bytes,
                    )
                    .map_err(|_| format!("font file {} is not a usable TrueType font", path.display()))?;
                    plotters::style::register_font(
                        family,
                        plotters::style::FontStyle::Bold,
                        bytes,
                    )
                    .map_err(|_| format!("font file {} is not a usable TrueType font", path.display()))?;
                }
                return Ok(());
            }
        }
        Err("no TrueType font found for plots: install Debian's fonts-dejavu-core, or set COVNOISE_FONT=/path/to/font.ttf".to_string())
    });
    result.clone().map_err(anyhow::Error::msg)
}
