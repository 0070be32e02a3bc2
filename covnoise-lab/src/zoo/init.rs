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
