//! VGG-11 and VGG-16 with batch normalization (Simonyan & Zisserman 2015),
//! CIFAR variant: 3x3 convolutions with padding 1 (with bias, as PyTorch's
//! default), each followed by batch normalization and ReLU, 2x2 max-pooling
//! between stages, and one Linear 512 -> classes on the 1x1x512 output (the
//! widely used pytorch-cifar definition).

use burn::module::Module;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use super::init::{SeededInit, WeightInit};
use super::lenet::max_pool2;
use covnoise::kernels;
use covnoise::model::{GhostBatchNorm, Probes};

/// One entry of a VGG configuration: a conv layer's output channels, or a
/// max-pool.
#[derive(Debug, Clone, Copy)]
enum Stage {
    Conv(usize),
    Pool,
}

use Stage::{Conv as C, Pool as P};

/// VGG-11's layers (configuration "A").
const VGG11: [Stage; 13] = [
    C(64),
    P,
    C(128),
    P,
    C(256),
    C(256),
    P,
    C(512),
    C(512),
    P,
    C(512),
    C(512),
    P,
];

/// VGG-16's layers (configuration "D").
const VGG16: [Stage; 18] = [
    C(64),
    C(64),
    P,
    C(128),
    C(128),
    P,
    C(256),
    C(256),
    C(256),
    P,
    C(512),
    C(512),
    C(512),
    P,
    C(512),
    C(512),
    C(512),
    P,
];

/// A conv layer followed by its batch normalization.
#[derive(Module, Debug)]
pub struct ConvBn {
    /// 3x3 convolution, padding 1.
    pub conv: Conv2d,
    /// Batch normalization of its output.
    pub norm: GhostBatchNorm,
}

/// VGG with batch normalization for 32x32 colour images.
#[derive(Module, Debug)]
pub struct Vgg {
    /// Conv + batch-norm layers, input to output.
    pub features: Vec<ConvBn>,
    /// Whether a 2x2 max-pool follows each feature layer.
    pub pool_after: Vec<bool>,
    /// Linear 512 -> classes.
    pub classifier: Linear,
}

impl Vgg {
    /// VGG-`depth` (11 or 16) for 3-channel 32x32 images, batch
    /// normalization over groups of `bn_group` examples (0: the whole batch),
    /// PyTorch's default initialization drawn from `seed`.
    pub fn new(depth: usize, classes: usize, bn_group: usize, seed: u64, device: &Device) -> Self {
        let stages: &[Stage] = match depth {
            11 => &VGG11,
            16 => &VGG16,
            _ => panic!("VGG depth {depth}: 11 or 16 (checked by the configuration)"),
        };
        let mut init = SeededInit::new(seed, device);
        let (mut features, mut pool_after) = (Vec::new(), Vec::new());
        let mut channels = 3;
        for stage in stages {
            match *stage {
                Stage::Conv(out) => {
                    features.push(ConvBn {
                        conv: init.conv([channels, out], 3, 1, 1, true, WeightInit::Default),
                        norm: GhostBatchNorm::new(out, bn_group, device),
                    });
                    pool_after.push(false);
                    channels = out;
                }
                Stage::Pool => {
                    *pool_after.last_mut().expect("a pool follows a conv") = true;
                }
            }
        }
        Self {
            features,
            pool_after,
            classifier: init.linear(512, classes, WeightInit::Default),
        }
    }

    /// Logits `[B, classes]` of images `x` `[B, 3, 32, 32]`.
    pub fn forward(&self, x: Tensor<4>, probes: &mut Probes) -> Tensor<2> {
        let mut h = x;
        for (layer, &pool) in self.features.iter().zip(&self.pool_after) {
            let z = probes.conv2d(&layer.conv, h);
            h = kernels::relu(probes.batch_norm(&layer.norm, z));
            if pool {
                h = max_pool2(h);
            }
        }
        probes.linear(&self.classifier, h.flatten(1, 3))
    }
}
