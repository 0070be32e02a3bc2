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
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};

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
        if self.downsample {
            option_a_shortcut(x, self.pad_channels)
        } else {
            x
        }
    }
}

/// Option A's down-sampling shortcut, `x[:, :, ::2, ::2]` (the positions of
/// even row and column) with `pad` zero channels on each side, computed as
/// a 1x1 convolution of stride 2 whose fixed weight (a constant, not a
/// parameter) is the identity between `pad` zero rows above and below. As
/// a convolution it runs on the fast kernels over the threads, and its
/// backward step is the convolution's input gradient; burn's slices and
/// concatenation, with backward steps that write into zeroed full-size
/// buffers, ran on the calling thread while the others waited (about 7 %
/// of a ResNet-20 step at batch 128). Each output is one input times 1
/// plus the others times 0, so finite inputs come through unchanged; a
/// non-finite input would spread NaN over its position's channels, where
/// the slices leave other channels alone (its block's convolution has
/// already made the step non-finite then).
fn option_a_shortcut(x: Tensor<4>, pad: usize) -> Tensor<4> {
    let [_, c, _, _] = x.dims();
    let out = c + 2 * pad;
    let mut identity = vec![0.0f32; out * c];
    for i in 0..c {
        identity[(pad + i) * c + i] = 1.0;
    }
    let weight = Tensor::<4>::from_data(TensorData::new(identity, [out, c, 1, 1]), &x.device());
    kernels::conv2d(x, weight, None, ConvOptions::new([2, 2], [0, 0], [1, 1], 1))
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

#[cfg(test)]
mod tests {
    use super::*;
    use covnoise::tensor_util::to_vec;

    /// The shortcut equals its definition by loops (the even positions,
    /// zero channels around them), and its input gradient puts the output
    /// gradient back on the even positions with zeros elsewhere, exactly,
    /// on the fast kernels (8 x 9 = 72 output positions, above
    /// `kernels::MIN_POSITIONS`) and on burn's ops, for an odd width too
    /// (`::2` keeps the last column).
    #[test]
    fn option_a_shortcut_is_the_even_positions_between_zero_channels() {
        let (b, c, h, w, pad) = (3usize, 4usize, 16usize, 17usize, 2usize);
        let (ho, wo, out) = (h.div_ceil(2), w.div_ceil(2), c + 2 * pad);
        let x_vals: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i as f32) * 0.37).sin() * 3.0)
            .collect();
        let dy_vals: Vec<f32> = (0..b * out * ho * wo)
            .map(|i| ((i as f32) * 0.91).cos())
            .collect();
        let mut want = vec![0.0f32; b * out * ho * wo];
        let mut want_dx = vec![0.0f32; b * c * h * w];
        for n in 0..b {
            for ch in 0..c {
                for r in 0..ho {
                    for col in 0..wo {
                        let from = ((n * c + ch) * h + 2 * r) * w + 2 * col;
                        let to = ((n * out + pad + ch) * ho + r) * wo + col;
                        want[to] = x_vals[from];
                        want_dx[from] = dy_vals[to];
                    }
                }
            }
        }
        let dev = Device::flex().autodiff();
        for fast in [true, false] {
            kernels::with_enabled(fast, || {
                let x = Tensor::<4>::from_data(TensorData::new(x_vals.clone(), [b, c, h, w]), &dev)
                    .require_grad();
                let y = option_a_shortcut(x.clone(), pad);
                assert_eq!(y.dims(), [b, out, ho, wo]);
                assert_eq!(to_vec(&y).unwrap(), want, "forward, fast kernels {fast}");
                let dy = Tensor::<4>::from_data(TensorData::new(dy_vals.clone(), y.dims()), &dev);
                let grads = (y * dy).sum().backward();
                let dx = to_vec(&x.grad(&grads).unwrap()).unwrap();
                assert_eq!(dx, want_dx, "input gradient, fast kernels {fast}");
            });
        }
    }
}
