//! Any burn module's float tensors (parameters and buffers such as
//! batch-norm running statistics) to and from safetensors, named by their
//! path in the module (`layers.0.weight`), so that Python's and Rust's
//! safetensors readers can load them.
//!
//! The file's metadata also records each tensor's burn `ParamId`: an
//! optimizer's state is keyed by `ParamId`, so restoring the ids lets a
//! saved optimizer state find its parameters again.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{CovnoiseError, Result};
use crate::tensor_util::to_vec;

/// Metadata key naming the writer.
const FORMAT_KEY: &str = "format";
/// This module's format name.
const FORMAT: &str = "covnoise-weights";
/// Metadata key of the JSON map path -> ParamId.
const IDS_KEY: &str = "param-ids";

/// One float tensor of a module, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Path in the module, e.g. `layers.0.weight`.
    pub name: String,
    /// burn's id of the parameter (None when read from a file without ids).
    pub id: Option<u64>,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Every float tensor of `module`, parameters and buffers, in visiting order.
pub fn collect<M: Module>(module: &M) -> Result<Vec<NamedTensor>> {
    let mut visitor = Collect::default();
    module.visit(&mut visitor);
    visitor.tensors.into_iter().collect()
}

#[derive(Default)]
struct Collect {
    path: Vec<String>,
    tensors: Vec<Result<NamedTensor>>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push(crate::params::path_segment(name, container_type));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val().inner();
        let shape = value.dims().to_vec();
        let n = value.shape().num_elements();
        let name = crate::params::join_path(&self.path);
        self.tensors
            .push(to_vec(&value.reshape([n])).map(|values| NamedTensor {
                name,
                id: Some(param.id.val()),
                shape,
                values,
            }));
    }
}

/// Serializes `tensors` as a safetensors file (float32, little-endian) whose
/// metadata names the format and the tensors' ids.
pub fn to_safetensors(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    let mut names = BTreeMap::new();
    let mut ids = BTreeMap::new();
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for t in tensors {
        if names.insert(t.name.clone(), ()).is_some() {
            return Err(CovnoiseError::Shape(format!(
                "two tensors are named {:?}",
                t.name
            )));
        }
        if let Some(id) = t.id {
            ids.insert(t.name.clone(), id);
        }
        let data: Vec<u8> = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.push((t.name.clone(), t.shape.clone(), data));
    }
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (name.as_str(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CovnoiseError::Shape(format!("safetensors: {e}")))?;
    let mut meta = HashMap::new();
    meta.insert(FORMAT_KEY.to_string(), FORMAT.to_string());
    meta.insert(
        IDS_KEY.to_string(),
        serde_json::to_string(&ids).expect("a map of integers serializes"),
    );
    safetensors::serialize(views, Some(meta))
        .map_err(|e| CovnoiseError::Shape(format!("safetensors: {e}")))
}

/// Reads a safetensors file's float tensors (float32, or bfloat16/float64
/// converted to float32), with the ids recorded in its metadata.
/// Errors name the problem; they never panic on malformed input.
pub fn from_safetensors(bytes: &[u8]) -> Result<Vec<NamedTensor>> {
    let bad = |m: String| CovnoiseError::Unsupported(m);
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let ids: BTreeMap<String, u64> = match metadata.metadata().as_ref().and_then(|m| m.get(IDS_KEY))
    {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| bad(format!("unreadable {IDS_KEY} metadata ({e})")))?,
        None => BTreeMap::new(),
    };
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let mut tensors = Vec::new();
    for (name, view) in file.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            other => {
                return Err(bad(format!(
                    "tensor {name} has type {other:?}; covnoise reads F32, F64 and BF16"
                )));
            }
        };
        let shape = view.shape().to_vec();
        if values.len() != shape.iter().product::<usize>() {
            return Err(bad(format!("tensor {name}: data does not match its shape")));
        }
        tensors.push(NamedTensor {
            id: ids.get(&name).copied(),
            name,
            shape,
            values,
        });
    }
    // safetensors orders by offset; sort by name for a stable order.
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// Replaces every float tensor of `module` by the tensor of the same path
/// in `tensors`. Every tensor of the module must be there with its shape,
/// and every tensor given must belong to the module: a file of another
/// architecture is refused, naming the first mismatch. With `restore_ids`,
/// parameters also take the recorded `ParamId`s (for a saved optimizer
/// state).
pub fn load_into<M: Module>(module: M, tensors: &[NamedTensor], restore_ids: bool) -> Result<M> {
    let by_name: HashMap<&str, &NamedTensor> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut mapper = Load {
        path: Vec::new(),
        tensors: by_name,
        restore_ids,
        used: 0,
        error: None,
    };
    let module = module.map(&mut mapper);
    if let Some(e) = mapper.error {
        return Err(e);
    }
    if mapper.used != tensors.len() {
        let names: Vec<String> = collect(&module)?.into_iter().map(|t| t.name).collect();
        let extra = tensors
            .iter()
            .find(|t| !names.contains(&t.name))
            .map_or_else(|| "?".to_string(), |t| t.name.clone());
        return Err(CovnoiseError::Shape(format!(
            "tensor {extra} is not in the model (another architecture?)"
        )));
    }
    Ok(module)
}

struct Load<'a> {
    path: Vec<String>,
    tensors: HashMap<&'a str, &'a NamedTensor>,
    restore_ids: bool,
    used: usize,
    error: Option<CovnoiseError>,
}

impl ModuleMapper for Load<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push(crate::params::path_segment(name, container_type));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let name = crate::params::join_path(&self.path);
        let (id, old, mapper) = param.consume();
        let dims = old.dims().to_vec();
        let Some(t) = self.tensors.get(name.as_str()) else {
            self.error = Some(CovnoiseError::Shape(format!(
                "tensor {name} {dims:?} is missing (another architecture?)"
            )));
            return Param::from_mapped_value(id, old, mapper);
        };
        if t.shape != dims {
            self.error = Some(CovnoiseError::Shape(format!(
                "tensor {name} has shape {:?} in the file, {dims:?} in the model",
                t.shape
            )));
            return Param::from_mapped_value(id, old, mapper);
        }
        self.used += 1;
        let device = old.device();
        let mut value = Tensor::<D>::from_data(TensorData::new(t.values.clone(), dims), &device);
        if old.is_require_grad() {
            value = value.require_grad();
        }
        let id = match (self.restore_ids, t.id) {
            (true, Some(saved)) => ParamId::from(saved),
            _ => id,
        };
        Param::from_mapped_value(id, value, mapper)
    }
}
