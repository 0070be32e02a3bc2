//! LeNet-5 for 28x28 grey images (LeCun et al. 1998, in its common modern
//! form): conv 5x5 1->6 with padding 2, ReLU, max-pool 2; conv 5x5 6->16,
//! ReLU, max-pool 2; Linear 400-120-84-classes with ReLU. No batch
//! normalization, so every example is independent and the exact estimator
//! applies. Every layer goes through [`Probes`].

use burn::module::Module;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor};

use super::init::{SeededInit, WeightInit};
use covnoise::kernels;
use covnoise::model::Probes;

/// LeNet-5 (61,706 parameters for 10 classes).
#[derive(Module, Debug)]
pub struct LeNet5 {
    /// 1 -> 6 channels, 5x5, padding 2.
    pub conv1: Conv2d,
    /// 6 -> 16 channels, 5x5.
    pub conv2: Conv2d,
    /// 400 -> 120.
    pub fc1: Linear,
    /// 120 -> 84.
    pub fc2: Linear,
    /// 84 -> classes.
    pub fc3: Linear,
}

/// 2x2 max pooling with stride 2 (covnoise's fast kernel on flex).
pub(crate) fn max_pool2(x: Tensor<4>) -> Tensor<4> {
    covnoise::kernels::max_pool2d(x, MaxPoolOptions::new([2, 2]).with_stride([2, 2]))
}

impl LeNet5 {
    /// A new LeNet-5 with PyTorch's default initialization, drawn from
    /// `seed`.
    pub fn new(classes: usize, seed: u64, device: &Device) -> Self {
        let mut init = SeededInit::new(seed, device);
        let d = WeightInit::Default;
        Self {
            conv1: init.conv([1, 6], 5, 1, 2, true, d),
            conv2: init.conv([6, 16], 5, 1, 0, true, d),
            fc1: init.linear(400, 120, d),
            fc2: init.linear(120, 84, d),
            fc3: init.linear(84, classes, d),
        }
    }

    /// Logits `[B, classes]` of images `x` `[B, 1, 28, 28]`.
    pub fn forward(&self, x: Tensor<4>, probes: &mut Probes) -> Tensor<2> {
        let h = max_pool2(kernels::relu(probes.conv2d(&self.conv1, x)));
        let h = max_pool2(kernels::relu(probes.conv2d(&self.conv2, h)));
        let h: Tensor<2> = h.flatten(1, 3);
        let h = kernels::relu(probes.linear(&self.fc1, h));
        let h = kernels::relu(probes.linear(&self.fc2, h));
        probes.linear(&self.fc3, h)
    }
}
