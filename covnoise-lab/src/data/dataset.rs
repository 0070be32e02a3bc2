//! The hub of the data module: [`DatasetKind`] names every image data set
//! and dispatches to its loader. The loaders (`fashion`, `cifar`) and the
//! types they share (`memory`, `split`, `locate`) sit below it and never
//! import it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::augment::Augmentation;
use super::cifar::{self, Cifar100Label};
use super::error::DataError;
use super::fashion;
use super::split::{LoadOptions, TrainTest};

/// The image data sets this crate can load, by their command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// Fashion-MNIST: 10 classes of 28x28 grey images ("fashion-mnist").
    FashionMnist,
    /// CIFAR-10: 10 classes of 32x32 colour images ("cifar10").
    Cifar10,
    /// CIFAR-100 with its 100 fine labels ("cifar100").
    Cifar100,
    /// CIFAR-100 with its 20 coarse labels ("cifar100-coarse").
    Cifar100Coarse,
}

impl DatasetKind {
    /// Every kind, in the order `--help` should list them.
    pub const ALL: [DatasetKind; 4] = [
        DatasetKind::FashionMnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::Cifar100Coarse,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Cifar100Coarse => "cifar100-coarse",
        }
    }

    /// Number of classes.
    pub fn num_classes(self) -> usize {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Cifar10 => 10,
            DatasetKind::Cifar100 => 100,
            DatasetKind::Cifar100Coarse => 20,
        }
    }

    /// Shape of one example, channels first.
    pub fn shape(self) -> [usize; 3] {
        match self {
            DatasetKind::FashionMnist => {
                [1, fashion::FASHION_MNIST_SIDE, fashion::FASHION_MNIST_SIDE]
            }
            _ => [cifar::CIFAR_CHANNELS, cifar::CIFAR_SIDE, cifar::CIFAR_SIDE],
        }
    }

    /// The training augmentation of the standard recipe for this data set:
    /// [`Augmentation::cifar`] for the CIFAR kinds, none for Fashion-MNIST
    /// (whose usual recipe has none: its images are centred and upright).
    pub fn default_augmentation(self) -> Option<Augmentation> {
        match self {
            DatasetKind::FashionMnist => None,
            DatasetKind::Cifar10 | DatasetKind::Cifar100 | DatasetKind::Cifar100Coarse => {
                Some(Augmentation::cifar())
            }
        }
    }

    /// Loads the data set. `dir` is `--data DIR`; Fashion-MNIST falls back to
    /// `COVNOISE_DATA` and then the Debian location, while CIFAR has no
    /// default location and needs `dir`.
    pub fn load(self, dir: Option<&Path>, opts: &LoadOptions) -> Result<TrainTest, DataError> {
        let need_dir = || {
            dir.ok_or_else(|| {
                DataError::Invalid(format!(
                    "{} has no default location: pass --data DIR (the extracted binary version)",
                    self.name()
                ))
            })
        };
        match self {
            DatasetKind::FashionMnist => fashion::load_fashion_mnist(dir, opts),
            DatasetKind::Cifar10 => cifar::load_cifar10(need_dir()?, opts),
            DatasetKind::Cifar100 => cifar::load_cifar100(need_dir()?, Cifar100Label::Fine, opts),
            DatasetKind::Cifar100Coarse => {
                cifar::load_cifar100(need_dir()?, Cifar100Label::Coarse, opts)
            }
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatasetKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = DatasetKind::ALL.iter().map(|k| k.name()).collect();
                DataError::Invalid(format!(
                    "unknown data set {s:?}; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for k in DatasetKind::ALL {
            assert_eq!(k.name().parse::<DatasetKind>().unwrap(), k);
            assert!(k.shape().iter().product::<usize>() > 0);
        }
        assert!("mnist".parse::<DatasetKind>().is_err());
    }

    #[test]
    fn only_cifar_is_augmented_by_default() {
        for k in DatasetKind::ALL {
            let want = (k != DatasetKind::FashionMnist).then(Augmentation::cifar);
            assert_eq!(k.default_augmentation(), want, "{k}");
            if let Some(a) = k.default_augmentation() {
                let shape = k.shape();
                assert!(a.check(&shape, &vec![0.0; shape[0]]).is_ok());
            }
        }
        assert_eq!(
            Augmentation::cifar(),
            Augmentation {
                crop_padding: 4,
                flip: true
            }
        );
    }
}
