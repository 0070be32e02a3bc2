//! covnoise's own models: plain burn modules whose layers go through
//! [`covnoise::model::Probes`], users of the library like anyone's model.
//! [`Network`] is the one model type of the command line.

pub mod init;
mod lenet;
mod mlp;
mod network;
mod resnet;
mod sequential;
mod vgg;

pub use lenet::LeNet5;
pub use mlp::{Mlp, MlpConfig, Normalization};
pub use network::{Architecture, Network, NetworkConfig};
pub use resnet::{BasicBlock, ResNet};
pub use sequential::{
    LayerSpec, Sequential, SequentialPlan, layers_to_string, parse_layers, plan_layers,
};
pub use vgg::{ConvBn, Vgg};
