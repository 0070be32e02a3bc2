//! Where data comes from: the record of a loaded data set's directory and
//! files, why that directory was chosen, and the lookup of a file that may
//! be plain or gzipped. Shared by every loader.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable naming a directory with the data files.
pub const DATA_ENV_VAR: &str = "COVNOISE_DATA";

/// Why a data directory was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirOrigin {
    /// Given on the command line (`--data DIR`).
    Explicit,
    /// Taken from the `COVNOISE_DATA` environment variable.
    EnvVar,
    /// The default location, as neither of the above was given.
    Default,
}

impl DirOrigin {
    /// A short label, e.g. for lists of tried directories.
    pub fn label(self) -> &'static str {
        match self {
            DirOrigin::Explicit => "--data",
            DirOrigin::EnvVar => DATA_ENV_VAR,
            DirOrigin::Default => "default",
        }
    }
}

impl fmt::Display for DirOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirOrigin::Explicit => "given with --data",
            DirOrigin::EnvVar => "from the COVNOISE_DATA environment variable",
            DirOrigin::Default => {
                "the default location of Debian's dataset-fashion-mnist; \
                 neither --data nor COVNOISE_DATA was given"
            }
        })
    }
}

/// Where a loaded data set came from; serializable for the run's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSource {
    /// The data set's name, e.g. "fashion-mnist".
    pub dataset: String,
    /// The directory read.
    pub dir: PathBuf,
    /// Why that directory.
    pub origin: DirOrigin,
    /// Every file read, in order.
    pub files: Vec<PathBuf>,
}

/// `dir/name` if it is a file, else `dir/name.gz` if that is, else `None`.
/// Plain wins so that a user who unpacked the files gets the fast path.
pub(crate) fn locate(dir: &Path, name: &str) -> Option<PathBuf> {
    let plain = dir.join(name);
    if plain.is_file() {
        return Some(plain);
    }
    let mut gz = OsString::from(plain.as_os_str());
    gz.push(".gz");
    let gz = PathBuf::from(gz);
    gz.is_file().then_some(gz)
}
