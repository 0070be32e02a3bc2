//! The process group seen by the training step: a sum all-reduce over a flat
//! buffer. A single process is the trivial group; the MPI adapter (feature
//! `mpi`) implements the same trait, so the step and the loop are the same
//! code on one process or many.

use burn::module::Module;
use burn::tensor::Tensor;

use crate::error::Result;
use crate::tensor_util::{from_vec1, to_vec};

/// A group of processes that each hold a shard of the batch.
pub trait Collective {
    /// This process's index in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Replaces `buffer` on every process by the elementwise sum over all
    /// processes.
    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<()>;
}

impl<T: Collective + ?Sized> Collective for Box<T> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&self, buffer: &mut [f32]) -> Result<()> {
        (**self).all_reduce_sum(buffer)
    }
}

/// The single-process group: all-reduce is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buffer: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// Sums `tensors` and `scalars` over the group with one all-reduce call,
/// packing everything into a single buffer (one message per step rather than
/// one per parameter). On a single process nothing is copied.
pub fn all_reduce_packed(
    collective: &dyn Collective,
    tensors: &mut [Tensor<1>],
    scalars: &mut [f64],
) -> Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let mut buffer = Vec::new();
    for t in tensors.iter() {
        buffer.extend(to_vec(t)?);
    }
    let offset = buffer.len();
    buffer.extend(scalars.iter().map(|&s| s as f32));
    collective.all_reduce_sum(&mut buffer)?;
    let mut start = 0;
    for t in tensors.iter_mut() {
        let n = t.dims()[0];
        *t = from_vec1(buffer[start..start + n].to_vec(), &t.device());
        start += n;
    }
    for (s, v) in scalars.iter_mut().zip(&buffer[offset..]) {
        *s = *v as f64;
    }
    Ok(())
}

/// Whether every process holds bit-identical `tensors`: each process puts a
/// 32-bit hash of its values (as two 16-bit halves, exact in float32) in its
/// own slot of a zeroed buffer, one all-reduce gathers all slots, and every
/// process compares them.
pub fn replicas_identical(collective: &dyn Collective, tensors: &[Tensor<1>]) -> Result<bool> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(true);
    }
    // FNV-1a over the bit patterns: any differing bit changes the hash.
    let mut hash: u32 = 0x811c_9dc5;
    for t in tensors {
        for v in to_vec(t)? {
            for byte in v.to_bits().to_le_bytes() {
                hash ^= byte as u32;
                hash = hash.wrapping_mul(0x0100_0193);
            }
        }
    }
    let mut slots = vec![0.0f32; 2 * world];
    let r = collective.rank();
    slots[2 * r] = (hash >> 16) as f32;
    slots[2 * r + 1] = (hash & 0xffff) as f32;
    collective.all_reduce_sum(&mut slots)?;
    Ok(slots.chunks(2).all(|s| s == &slots[..2]))
}

/// Replaces every buffer of `model` (a float tensor that takes no gradient,
/// such as batch-norm running statistics) by its average over the group, so
/// that replicas that normalized different shards evaluate the same model.
pub fn average_buffers<M: Module>(model: M, collective: &dyn Collective) -> Result<M> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(model);
    }
    let mut buffers = crate::params::flat_values(&model, false);
    if buffers.is_empty() {
        return Ok(model);
    }
    all_reduce_packed(collective, &mut buffers, &mut [])?;
    Ok(crate::params::replace_buffers(
        model,
        buffers.into_iter().map(|b| b / world as f32).collect(),
    ))
}
