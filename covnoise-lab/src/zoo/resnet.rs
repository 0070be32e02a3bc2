//! The CIFAR ResNets of He et al. (2016, section 4.2): a 3x3 conv to 16
//! channels, three stages of n basic blocks with 16, 32 and 64 channels
//! (stride 2 at the first block of stages 2 and 3), global average pooling
//! and a Linear layer; depth 6n + 2 (20, 32, 44, 56). Convolutions have no
//! bias (batch normalization follows each). Shortcuts are identities; on
//! down-sampling the identity takes every second position and pads the new
//! channels with zeros ("option A", parameter-free). Weights are drawn with
//! `kaiming_normal_`, as the common PyTorch reproduction does.

use burn::module::Module;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};

use super::init::{SeededInit, WeightInit};
use covnoise::kernels;
use covnoise::model::{GhostBatchNorm, Probes};

/// conv-bn-relu-conv-bn, plus the shortcut, then ReLU.
#[derive(Module, Debug)]
pub struct BasicBlock {
    /// First 3x3 conv (carries the block's stride).
    pub conv1: Conv2d,
    /// Its batch normalization.
    pub bn1: GhostBatchNorm,
    /// Second 3x3 conv.
    pub conv2: Conv2d,
    /// Its batch normalization.
    pub bn2: GhostBatchNorm,
    /// Zero channels added on each side of the shortcut (0: identity).
    pub pad_channels: usize,
    /// Whether the shortcut takes every second position.
    pub downsample: bool,
}

impl BasicBlock {
    fn forward(&self, x: Tensor<4>, probes: &mut Probes) -> Tensor<4> {
        let z = probes.conv2d(&self.conv1, x.clone());
        let h = kernels::relu(probes.batch_norm(&self.bn1, z));
        let z = probes.conv2d(&self.conv2, h);
        let h = probes.batch_norm(&self.bn2, z);
        kernels::add_relu(h, self.shortcut(x))
    }

    /// Option A: `x[:, :, ::2, ::2]` with `pad_channels` zero channels on
    /// each side when the block down-samples, else `x`.
    fn shortcut(&self, x: Tensor<4>) -> Tensor<4> {
        if !self.downsample {
            return x;
        }
        let [b, c, h, w] = x.dims();
        let x = x
            .reshape([b * c, h / 2, 2, w / 2, 2])
            .narrow(2, 0, 1)
            .narrow(4, 0, 1)
            .reshape([b, c, h / 2, w / 2]);
        if self.pad_channels == 0 {
            return x;
        }
        let zeros = Tensor::<4>::zeros([b, self.pad_channels, h / 2, w / 2], &x.device());
        Tensor::cat(vec![zeros.clone(), x, zeros], 1)
    }
}

/// A CIFAR ResNet of depth 6n + 2.
#[derive(Module, Debug)]
pub struct ResNet {
    /// 3 -> 16 channels.
    pub conv: Conv2d,
    /// Its batch normalization.
    pub bn: GhostBatchNorm,
    /// 3n basic blocks.
    pub blocks: Vec<BasicBlock>,
    /// Linear 64 -> classes.
    pub fc: Linear,
}

impl ResNet {
    /// ResNet-`depth` (20, 32, 44, 56, ...: 6n + 2) for 3-channel 32x32
    /// images with batch normalization over groups of `bn_group` examples
    /// (0: the whole batch), weights drawn from `seed`.
    pub fn new(depth: usize, classes: usize, bn_group: usize, seed: u64, device: &Device) -> Self {
        assert!(
            depth >= 8 && (depth - 2).is_multiple_of(6),
            "ResNet depth {depth}: 6n + 2 (checked by the configuration)"
        );
        let n = (depth - 2) / 6;
        let mut init = SeededInit::new(seed, device);
        let k = WeightInit::KaimingNormal;
        let conv = init.conv([3, 16], 3, 1, 1, false, k);
        let bn = GhostBatchNorm::new(16, bn_group, device);
        let mut blocks = Vec::new();
        let mut channels = 16;
        for (stage, width) in [16usize, 32, 64].into_iter().enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock {
                    conv1: init.conv([channels, width], 3, stride, 1, false, k),
                    bn1: GhostBatchNorm::new(width, bn_group, device),
                    conv2: init.conv([width, width], 3, 1, 1, false, k),
                    bn2: GhostBatchNorm::new(width, bn_group, device),
                    pad_channels: (width - channels) / 2,
                    downsample: stride == 2,
                });
                channels = width;
            }
        }
        Self {
            conv,
            bn,
            blocks,
            fc: init.linear(64, classes, k),
        }
    }

    /// Logits `[B, classes]` of images `x` `[B, 3, 32, 32]`.
    pub fn forward(&self, x: Tensor<4>, probes: &mut Probes) -> Tensor<2> {
        let z = probes.conv2d(&self.conv, x);
        let mut h = kernels::relu(probes.batch_norm(&self.bn, z));
        for block in &self.blocks {
            h = block.forward(h, probes);
        }
        // Global average pooling over the 8x8 positions.
        let h: Tensor<2> = h.mean_dim(2).mean_dim(3).flatten(1, 3);
        probes.linear(&self.fc, h)
    }
}
