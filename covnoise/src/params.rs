//! Any burn module's float parameters as one ordered table, and the bridge
//! between burn's `GradientsParams` (keyed by `ParamId`, one rank per
//! parameter) and flat rank-1 tensors.
//!
//! Every later stage (second moments, noise, all-reduce) works on flat
//! vectors aligned with a [`ParamTable`], so it handles a Linear weight, a
//! conv kernel `[out, in, kh, kw]`, a batch-norm scale or an embedding table
//! the same way; only the boundary with burn knows ranks. The table's order
//! is the module's visiting order, which is the same in every process that
//! builds the same architecture (a `ParamId` is not: it is drawn at random).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};

use crate::error::{CovnoiseError, Result};

/// Runs `$body` with the const `$d` equal to the runtime rank `$rank`
/// (1..=6); evaluates to `Err(rank)` for any other rank.
macro_rules! with_rank {
    ($rank:expr, $d:ident => $body:block) => {
        match $rank {
            1 => {
                const $d: usize = 1;
                Ok($body)
            }
            2 => {
                const $d: usize = 2;
                Ok($body)
            }
            3 => {
                const $d: usize = 3;
                Ok($body)
            }
            4 => {
                const $d: usize = 4;
                Ok($body)
            }
            5 => {
                const $d: usize = 5;
                Ok($body)
            }
            6 => {
                const $d: usize = 6;
                Ok($body)
            }
            other => Err(other),
        }
    };
}

/// One float parameter of a module.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    /// burn's identifier of the parameter.
    pub id: ParamId,
    /// Its path in the module, e.g. `layers.0.weight`.
    pub name: String,
    /// Its shape (any rank).
    pub shape: Vec<usize>,
}

impl ParamEntry {
    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The float parameters of a module that take gradients, in visiting order,
/// and the kinds of submodules seen (to recognize batch normalization).
#[derive(Debug, Clone, Default)]
pub struct ParamTable {
    entries: Vec<ParamEntry>,
    /// Every module that holds a field, as (its path, its type), in
    /// visiting order.
    containers: Vec<(String, String)>,
}

impl ParamTable {
    /// Walks `module` with a [`ModuleVisitor`].
    pub fn of<M: Module>(module: &M) -> Self {
        let mut visitor = TableVisitor::default();
        module.visit(&mut visitor);
        Self {
            entries: visitor.entries,
            containers: visitor.containers,
        }
    }

    /// The parameters, in order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// Number of parameter tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True for a module without float parameters.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scalar parameters d.
    pub fn num_params(&self) -> usize {
        self.entries.iter().map(ParamEntry::numel).sum()
    }

    /// Position of parameter `id` in the table.
    pub fn index_of(&self, id: ParamId) -> Option<usize> {
        self.entries.iter().position(|e| e.id == id)
    }

    /// The name of parameter `id` (its path), or a description for one the
    /// table does not hold (frozen, or of another module).
    pub fn name_of(&self, id: ParamId) -> String {
        self.index_of(id).map_or_else(
            || format!("(id {id}, not a trainable parameter of this model)"),
            |i| self.entries[i].name.clone(),
        )
    }

    /// The submodules whose type name ends in `BatchNorm` (burn's
    /// `BatchNorm`, covnoise's `GhostBatchNorm`, a user's own), as
    /// `(path, type name)` in visiting order.
    pub fn batch_norms(&self) -> Vec<(&str, &str)> {
        self.containers
            .iter()
            .filter_map(|(path, kind)| {
                let name = kind.rsplit(':').next().unwrap_or(kind);
                name.ends_with("BatchNorm").then_some((path.as_str(), name))
            })
            .collect()
    }

    /// The first submodule whose type normalizes over the batch (see
    /// [`ParamTable::batch_norms`]), by type name.
    pub fn batch_norm(&self) -> Option<&str> {
        self.batch_norms().first().map(|(_, kind)| *kind)
    }

    /// Moves the gradients of `grads` into flat rank-1 tensors in table
    /// order. A parameter without a gradient (it did not reach the loss) gets
    /// zeros on `device`; the gradient's shape must be the parameter's.
    pub fn flatten(&self, grads: &mut GradientsParams, device: &Device) -> Result<Vec<Tensor<1>>> {
        self.entries
            .iter()
            .map(|e| {
                let flat = with_rank!(e.shape.len(), D => {
                    grads.remove::<D>(e.id).map(|g| {
                        let dims = g.dims().to_vec();
                        (dims, g.reshape([e.numel()]))
                    })
                })
                .map_err(|r| unsupported_rank(e, r))?;
                match flat {
                    Some((dims, g)) if dims == e.shape => Ok(g),
                    Some((dims, _)) => Err(CovnoiseError::Shape(format!(
                        "gradient of {} has shape {dims:?}, the parameter {:?}",
                        e.name, e.shape
                    ))),
                    None => Ok(Tensor::zeros([e.numel()], device)),
                }
            })
            .collect()
    }

    /// Builds burn gradients (each reshaped to its parameter's shape) from
    /// flat tensors in table order.
    pub fn unflatten(&self, flat: Vec<Tensor<1>>) -> Result<GradientsParams> {
        if flat.len() != self.entries.len() {
            return Err(CovnoiseError::Shape(format!(
                "{} gradients for {} parameters",
                flat.len(),
                self.entries.len()
            )));
        }
        let mut grads = GradientsParams::new();
        for (e, g) in self.entries.iter().zip(flat) {
            if g.dims()[0] != e.numel() {
                return Err(CovnoiseError::Shape(format!(
                    "flat gradient of {} has {} values, the parameter {}",
                    e.name,
                    g.dims()[0],
                    e.numel()
                )));
            }
            with_rank!(e.shape.len(), D => {
                let shape: [usize; D] = e.shape.clone().try_into().expect("rank checked");
                grads.register::<D>(e.id, g.reshape(shape));
            })
            .map_err(|r| unsupported_rank(e, r))?;
        }
        Ok(grads)
    }

    /// The parameter values themselves, flat, in table order (detached from
    /// any autodiff graph).
    pub fn values<M: Module>(&self, module: &M) -> Vec<Tensor<1>> {
        flat_values(module, true)
    }
}

fn unsupported_rank(e: &ParamEntry, rank: usize) -> CovnoiseError {
    CovnoiseError::Unsupported(format!(
        "parameter {} has rank {rank}; covnoise handles ranks 1 to 6",
        e.name
    ))
}

/// The segment a module adds to its parameters' paths: its field name, or
/// nothing for the variant of an enum module (which model it is is the
/// run's configuration, not part of its weights' names, so that
/// `Network::Mlp`'s weights keep the MLP's own paths, `layers.0.weight`).
pub(crate) fn path_segment(name: &str, container_type: &str) -> String {
    if container_type.starts_with("Enum:") {
        String::new()
    } else {
        name.to_string()
    }
}

/// A parameter's path from its modules' segments.
pub(crate) fn join_path(path: &[String]) -> String {
    path.iter()
        .filter(|s| !s.is_empty())
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(".")
}

#[derive(Default)]
struct TableVisitor {
    path: Vec<String>,
    entries: Vec<ParamEntry>,
    containers: Vec<(String, String)>,
}

impl ModuleVisitor for TableVisitor {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        // `container_type` is the type of the module that holds field
        // `name`: the module itself lives at the path before the field.
        let entry = (join_path(&self.path), container_type.to_string());
        if self.containers.last() != Some(&entry) {
            self.containers.push(entry);
        }
        self.path.push(path_segment(name, container_type));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // Frozen parameters take no gradient, so they take no noise either.
        if !param.is_require_grad() {
            return;
        }
        let shape = param.lazy_shape().dims::<D>().to_vec();
        self.entries.push(ParamEntry {
            id: param.id,
            name: join_path(&self.path),
            shape,
        });
    }
}

/// Flat values (no autodiff) of a module's float tensors that take
/// gradients (`trainable`) or of those that do not (buffers such as
/// batch-norm running statistics), in visiting order.
pub fn flat_values<M: Module>(module: &M, trainable: bool) -> Vec<Tensor<1>> {
    let mut visitor = ValueVisitor {
        trainable,
        values: Vec::new(),
    };
    module.visit(&mut visitor);
    visitor.values
}

struct ValueVisitor {
    trainable: bool,
    values: Vec<Tensor<1>>,
}

impl ModuleVisitor for ValueVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.is_require_grad() != self.trainable {
            return;
        }
        let value = param.val().inner();
        let n = value.shape().num_elements();
        self.values.push(value.reshape([n]));
    }
}

/// `module` with its buffers (float tensors that take no gradient, in
/// visiting order, flat) replaced by `values`. A `RunningState` shares its
/// value with every clone of the module, so replacing the buffers of a
/// clone replaces the original's too.
pub fn replace_buffers<M: Module>(module: M, values: Vec<Tensor<1>>) -> M {
    let mut writer = BufferWriter {
        values: values.into_iter(),
    };
    module.map(&mut writer)
}

struct BufferWriter {
    values: std::vec::IntoIter<Tensor<1>>,
}

impl ModuleMapper for BufferWriter {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if param.is_require_grad() {
            return param;
        }
        let (id, value, mapper) = param.consume();
        let replaced = self
            .values
            .next()
            .expect("the same module visited twice yields the same buffers")
            .reshape(value.shape())
            .to_device(&value.device());
        Param::from_mapped_value(id, replaced, mapper)
    }
}

/// `module` with every trainable parameter moved by `scale` times its entry
/// of `direction` (flat, in table order), as a new leaf that takes
/// gradients under the same `ParamId`: the gradients of the moved module
/// flatten with the original's [`ParamTable`]. Buffers are shared with
/// `module` (a `RunningState` is shared by every clone).
pub fn shifted<M: Module>(module: &M, direction: &[Tensor<1>], scale: f32) -> Result<M> {
    let n = flat_values(module, true).len();
    if n != direction.len() {
        return Err(CovnoiseError::Shape(format!(
            "a direction of {} tensors for {n} trainable parameters",
            direction.len()
        )));
    }
    let mut shifter = Shifter {
        direction: direction.iter(),
        scale,
        error: None,
    };
    let moved = module.clone().map(&mut shifter);
    match shifter.error {
        Some(e) => Err(e),
        None => Ok(moved),
    }
}

struct Shifter<'a> {
    direction: std::slice::Iter<'a, Tensor<1>>,
    scale: f32,
    error: Option<CovnoiseError>,
}

impl ModuleMapper for Shifter<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.is_require_grad() || self.error.is_some() {
            return param;
        }
        let (id, value, mapper) = param.consume();
        let step = self
            .direction
            .next()
            .expect("the direction's length was checked against the parameters");
        if step.dims()[0] != value.shape().num_elements() {
            self.error = Some(CovnoiseError::Shape(format!(
                "a direction of {} values for a parameter of shape {:?}",
                step.dims()[0],
                value.dims()
            )));
            return Param::from_mapped_value(id, value, mapper);
        }
        let shape = value.shape();
        let moved = value.inner() + step.clone().reshape(shape) * self.scale;
        Param::from_mapped_value(id, moved.autodiff().require_grad(), mapper)
    }
}
