//! Seeded initialization of burn layers, as PyTorch initializes them, so
//! that the same seed gives the same model on every device and process.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// How a layer's weight is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightInit {
    /// PyTorch's default for `nn.Linear` and `nn.Conv2d`
    /// (`kaiming_uniform_(a = sqrt(5))`): `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    Default,
    /// `kaiming_normal_` (He et al. 2015, fan-in, ReLU gain):
    /// `N(0, 2 / fan_in)`, as the CIFAR ResNets initialize.
    KaimingNormal,
}

/// Draws layers' parameters from one seeded stream, in construction order.
#[derive(Debug)]
pub struct SeededInit {
    rng: ChaCha8Rng,
    device: Device,
}

impl SeededInit {
    /// A stream from `seed`, creating tensors on `device`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    fn draw(&mut self, n: usize, fan_in: usize, init: WeightInit) -> Vec<f32> {
        match init {
            WeightInit::Default => {
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n)
                    .map(|_| self.rng.random_range(-bound..bound))
                    .collect()
            }
            WeightInit::KaimingNormal => {
                let normal = Normal::new(0.0, (2.0 / fan_in as f64).sqrt())
                    .expect("a positive standard deviation");
                (0..n)
                    .map(|_| normal.sample(&mut self.rng) as f32)
                    .collect()
            }
        }
    }

    /// A Linear layer `input -> output` with a bias drawn as PyTorch's
    /// default (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`).
    pub fn linear(&mut self, input: usize, output: usize, init: WeightInit) -> Linear {
        let weight = self.draw(input * output, input, init);
        let bias = self.draw(output, input, WeightInit::Default);
        Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(weight, [input, output]),
                &self.device,
            )),
            bias: Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(bias, [output]),
                &self.device,
            ))),
        }
    }

    /// A square-kernel Conv2d layer `input -> output` channels with
    /// symmetric zero padding, and a bias (drawn as PyTorch's default) when
    /// `bias` is set.
    pub fn conv(
        &mut self,
        [input, output]: [usize; 2],
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        init: WeightInit,
    ) -> Conv2d {
        let fan_in = input * kernel * kernel;
        let weight = self.draw(output * fan_in, fan_in, init);
        let bias = bias.then(|| {
            let b = self.draw(output, fan_in, WeightInit::Default);
            Param::from_tensor(Tensor::from_data(
                TensorData::new(b, [output]),
                &self.device,
            ))
        });
        Conv2d {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(weight, [output, input, kernel, kernel]),
                &self.device,
            )),
            bias,
            stride: [stride, stride],
            kernel_size: [kernel, kernel],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Explicit(padding, padding, padding, padding),
        }
    }
}

/// How every weight and bias of a model is drawn (`--init`): the model's
/// own default, or one distribution for all of them, as some papers'
/// released code does (Wu et al. draw every parameter from N(0, 0.02²)).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum InitScheme {
    /// Each layer's own initialization (PyTorch's defaults, Kaiming for
    /// the ResNets).
    #[default]
    Default,
    /// Every trainable parameter from N(0, std²).
    Normal(f64),
    /// Every trainable parameter from U(-a, a).
    Uniform(f64),
}

impl std::fmt::Display for InitScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitScheme::Default => f.write_str("default"),
            InitScheme::Normal(s) => write!(f, "normal:{s}"),
            InitScheme::Uniform(a) => write!(f, "uniform:{a}"),
        }
    }
}

impl std::str::FromStr for InitScheme {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid init {s:?}: expected default, normal:STD or uniform:A with STD, A > 0")
        };
        let scale = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(bad)
        };
        match s.split_once(':') {
            None if s == "default" => Ok(InitScheme::Default),
            Some(("normal", v)) => Ok(InitScheme::Normal(scale(v)?)),
            Some(("uniform", v)) => Ok(InitScheme::Uniform(scale(v)?)),
            _ => Err(bad()),
        }
    }
}

impl serde::Serialize for InitScheme {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for InitScheme {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Domain of [`reinit`]'s generator, apart from the layers' own draws.
const REINIT_DOMAIN: u64 = 0x5245_494e_4954_0001;

/// `module` with every trainable parameter drawn afresh by `scheme` from
/// `seed`, in the module's visiting order (so the same seed gives the same
/// weights on every device and process); buffers are left as they are.
/// [`InitScheme::Default`] returns `module` unchanged.
pub fn reinit<M: burn::module::Module>(module: M, scheme: InitScheme, seed: u64) -> M {
    if scheme == InitScheme::Default {
        return module;
    }
    let mut drawer = Redraw {
        rng: ChaCha8Rng::seed_from_u64(seed ^ REINIT_DOMAIN),
        scheme,
    };
    module.map(&mut drawer)
}

struct Redraw {
    rng: ChaCha8Rng,
    scheme: InitScheme,
}

impl burn::module::ModuleMapper for Redraw {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.is_require_grad() {
            return param;
        }
        let (id, value, mapper) = param.consume();
        let shape = value.shape();
        let n = shape.num_elements();
        let values: Vec<f32> = match self.scheme {
            InitScheme::Normal(std) => {
                let normal = Normal::new(0.0, std).expect("a positive standard deviation");
                (0..n)
                    .map(|_| normal.sample(&mut self.rng) as f32)
                    .collect()
            }
            InitScheme::Uniform(a) => {
                let a = a as f32;
                (0..n).map(|_| self.rng.random_range(-a..a)).collect()
            }
            InitScheme::Default => unreachable!("returned early"),
        };
        let device = value.device();
        let drawn = Tensor::<D>::from_data(TensorData::new(values, shape.dims::<D>()), &device);
        Param::from_mapped_value(id, drawn.require_grad(), mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;

    #[derive(burn::module::Module, Debug)]
    struct Two {
        a: Linear,
        b: Linear,
    }

    fn values(m: &Two) -> Vec<f32> {
        covnoise::params::flat_values(m, true)
            .iter()
            .flat_map(|t| covnoise::tensor_util::to_vec(t).unwrap())
            .collect()
    }

    fn model() -> Two {
        let device = Device::flex().autodiff();
        Two {
            a: LinearConfig::new(60, 100).init(&device),
            b: LinearConfig::new(100, 10).init(&device),
        }
    }

    #[test]
    fn schemes_parse_print_and_refuse_bad_scales() {
        for s in ["default", "normal:0.02", "uniform:0.5"] {
            assert_eq!(s.parse::<InitScheme>().unwrap().to_string(), s);
        }
        for bad in [
            "normal",
            "normal:0",
            "normal:-1",
            "uniform:x",
            "gauss:1",
            "normal:inf",
        ] {
            assert!(bad.parse::<InitScheme>().is_err(), "{bad}");
        }
    }

    /// Every trainable parameter (7,110 here: weights and biases) is drawn
    /// from the scheme: the sample's std is within 5 % of 0.02 (its
    /// standard error is 1/sqrt(2n) ≈ 0.8 %) and its mean within 5 standard
    /// errors of 0; uniform values stay in (-a, a) and fill it (std a/√3).
    /// The same seed gives the same weights; the default changes nothing.
    #[test]
    fn redrawn_parameters_follow_the_scheme_from_the_seed() {
        let before = values(&model());
        let normal = values(&reinit(model(), InitScheme::Normal(0.02), 7));
        let n = normal.len() as f64;
        assert_eq!(n as usize, 60 * 100 + 100 + 100 * 10 + 10);
        let mean = normal.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let std = (normal
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!((std - 0.02).abs() < 0.05 * 0.02, "std {std}");
        assert!(mean.abs() < 5.0 * 0.02 / n.sqrt(), "mean {mean}");
        assert_eq!(
            normal,
            values(&reinit(model(), InitScheme::Normal(0.02), 7))
        );
        assert_ne!(
            normal,
            values(&reinit(model(), InitScheme::Normal(0.02), 8))
        );
        let uniform = values(&reinit(model(), InitScheme::Uniform(0.5), 7));
        assert!(uniform.iter().all(|x| x.abs() < 0.5));
        let ustd = (uniform.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n).sqrt();
        assert!(
            (ustd - 0.5 / 3f64.sqrt()).abs() < 0.05 * 0.5 / 3f64.sqrt(),
            "{ustd}"
        );
        assert_ne!(before, normal);
        let kept = model();
        let same = values(&kept);
        assert_eq!(values(&reinit(kept, InitScheme::Default, 7)), same);
    }
}
