//! Fast convolution and batch normalization on burn's flex CPU backend,
//! through burn's backend-extension mechanism (no fork of burn).
//!
//! burn 0.22.1's flex backend runs `conv2d` as an im2col product through
//! its 3-d convolution and leaves both convolution gradients to burn's
//! generic defaults (a transposed convolution for the input gradient, a
//! convolution with the whole output gradient as its kernel for the weight
//! gradient); batch normalization is a chain of elementwise ops and
//! reductions. [`conv2d`] and [`batch_norm`] run instead one `gemm` per
//! example with the unfolded input built in the layout the product wants,
//! and a two-pass batch normalization, each with a hand-written backward
//! step for burn's autodiff. The convolution's backward step forms the
//! weight gradient one example at a time, so when the probes ask for it
//! ([`conv2d_recording`]) it also sums the squares of those
//! per-example gradients ([`ConvSink`]): the exact and Monte-Carlo
//! Fisher estimators' conv factors at the cost of one pass over a
//! weight-sized buffer per example, with no per-example tensor kept; or,
//! asked for micro-batch gradients, it adds each example's gradient to its
//! micro-batch's sum instead of the batch's. [`linear`] is a Linear
//! layer's product with its backward step's two products on all threads
//! (faster than burn's flex matmul and its autodiff step),
//! [`group_outer`] runs a Linear layer's per-micro-batch products,
//! [`linear_grouped`] is a Linear product whose backward step hands the
//! probes its output gradient and, asked for them, forms those products
//! and takes the batch's weight gradient as their sum (micro-batch
//! gradients from the batch gradient's products), [`squared_outer`] is a
//! Linear layer's summed squared per-example weight gradients
//! `(a²)ᵀ(δ²)`, [`max_pool2d`] is max pooling without burn's 3-d detour,
//! [`relu()`] is ReLU spread over the threads (burn's flex backend runs
//! elementwise ops on the calling thread), and [`add_relu`] a residual
//! sum and the ReLU after it in one pass over them.
//!
//! Reach: the kernels run for `f32` tensors on `Device::flex()` and
//! `Device::flex().autodiff()`, for convolutions with groups 1, dilation 1
//! and at least [`MIN_POSITIONS`] output positions (any stride and
//! padding, `Same` included). Everything else (another device or dtype,
//! groups, dilation, small outputs) runs burn's own op, so the functions
//! here are a drop-in for burn's on every backend. covnoise's models reach
//! them through [`crate::model::Probes::conv2d`],
//! [`crate::model::Probes::linear`] and [`crate::model::GhostBatchNorm`];
//! a burn `Conv2d` or `Linear` called with `layer.forward(x)` runs burn's
//! op, [`conv2d_layer`] and [`linear_layer`] are the same calls on these
//! kernels.
//!
//! [`set_enabled`] turns them off for the process and [`with_enabled`] for
//! the calling thread (`covnoise bench`'s `plain-burn` variant and the
//! tests compare the two paths in one run).

mod conv;
mod extension;
mod norm;
mod outer;
mod pool;
mod relu;
mod shifted;
mod simd;

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, DispatchDevice};
use burn::nn::Linear;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{DType, Device, Tensor};

use conv::ConvShape;
pub use conv::{GradGroups, GradSquares, PerExample};
pub use extension::FastKernels;

/// Where the backward step of a fast convolution (or of the grouped Linear
/// product, [`linear_grouped`]) leaves what the probes need of it
/// ([`conv2d_recording`]): the gradient of the differentiated
/// objective with respect to the convolution's output (so that the probes
/// need no probe tensor of their own for it), and the sums over the
/// examples of the squared per-example weight and bias gradients
/// ([`GradSquares`]) or, for a sink made by [`ConvSink::grouped`], their
/// sums over consecutive groups of examples ([`GradGroups`]), formed from
/// the same per-example products as the weight gradient itself. Shared by
/// clones: the probes keep one, the backward step fills another. Empty
/// until a backward pass through a fast convolution (on `Autodiff<Flex>`)
/// fills it; a convolution that runs burn's op, or whose operands take no
/// gradient, leaves it empty.
#[derive(Debug, Clone)]
pub struct ConvSink(Arc<Mutex<SinkContents>>);

impl Default for ConvSink {
    fn default() -> Self {
        Self::with_mode(PerExample::Squares)
    }
}

/// What a [`ConvSink`] asks for and holds.
#[derive(Debug, Default)]
struct SinkContents {
    mode: PerExample,
    /// With [`PerExample::Groups`]: a kernel that can (the grouped Linear
    /// product) leaves the groups' sum and centered sum of squares instead
    /// of the groups' gradients.
    summary: bool,
    squares: Option<GradSquares>,
    groups: Option<GradGroups>,
    moments: Option<GroupMomentSums>,
    output_grad: Option<burn::backend::flex::FlexTensor>,
}

/// A layer's weight gradients over consecutive groups of examples,
/// summarized: their sum and their centered sum of squares around their
/// mean, `[numel]` each in the weight's layout (see
/// [`ConvSink::summarized`]).
#[derive(Debug, Clone)]
pub struct GroupMomentSums {
    /// Number of groups G.
    pub groups: usize,
    /// `Σ_g t_g`.
    pub sum: Vec<f32>,
    /// `Σ_g (t_g - t̄)²`, t̄ the groups' mean.
    pub centered: Vec<f32>,
}

impl ConvSink {
    /// An empty sink that asks for the sums of squares.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty sink that asks for the gradients of consecutive groups of
    /// `group_size` examples (micro-batch gradients) instead of squares.
    pub fn grouped(group_size: usize) -> Self {
        Self::with_mode(PerExample::Groups(group_size.max(1)))
    }

    /// As [`ConvSink::grouped`], for a pass that needs only the groups'
    /// sum and centered sum of squares (the micro-batch estimator's
    /// moment): the grouped Linear product ([`linear_grouped`]) then
    /// leaves those ([`GroupMomentSums`]) and no `[G, numel]` buffer;
    /// a convolution still leaves the groups' gradients.
    pub fn summarized(group_size: usize) -> Self {
        let sink = Self::grouped(group_size);
        sink.lock().summary = true;
        sink
    }

    /// Whether the sink asks for summarized groups.
    pub(crate) fn wants_summary(&self) -> bool {
        self.lock().summary
    }

    /// Takes the summarized groups out of the sink, if the backward step
    /// left them.
    pub(crate) fn take_moments(&self) -> Option<GroupMomentSums> {
        self.lock().moments.take()
    }

    /// Leaves summarized groups and the output gradient in the sink.
    pub(crate) fn put_moments(
        &self,
        moments: GroupMomentSums,
        output_grad: burn::backend::flex::FlexTensor,
    ) {
        let mut contents = self.lock();
        contents.moments = Some(moments);
        contents.output_grad = Some(output_grad);
    }

    fn with_mode(mode: PerExample) -> Self {
        Self(Arc::new(Mutex::new(SinkContents {
            mode,
            ..Default::default()
        })))
    }

    /// What the backward step forms of the per-example gradients.
    pub(crate) fn mode(&self) -> PerExample {
        self.lock().mode
    }

    /// The group gradients the backward step left, if it ran and they were
    /// asked for.
    pub fn groups(&self) -> Option<GradGroups> {
        self.lock().groups.clone()
    }

    /// Takes the group gradients out of the sink (no copy of them), if the
    /// backward step left them.
    pub(crate) fn take_groups(&self) -> Option<GradGroups> {
        self.lock().groups.take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkContents> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The squares the backward step left, if it ran.
    pub fn squares(&self) -> Option<GradSquares> {
        self.lock().squares.clone()
    }

    /// The output gradient `[B, C_out, H', W']` the backward step left, if
    /// it ran, as a tensor on the device of `like` (any tensor on the
    /// convolution's device, with or without autodiff; the gradient itself
    /// takes none).
    pub fn output_grad<const D: usize>(&self, like: &Tensor<D>) -> Option<Tensor<4>> {
        self.lock().output_grad.as_ref()?;
        Some(Tensor::from_dispatch(
            <Dispatch as FastKernels>::fast_sunk_output_grad(
                like.clone().into_dispatch(),
                self.clone(),
            ),
        ))
    }

    /// Leaves the backward step's results in the sink.
    pub(crate) fn put(
        &self,
        squares: Option<GradSquares>,
        groups: Option<GradGroups>,
        output_grad: burn::backend::flex::FlexTensor,
    ) {
        let mut contents = self.lock();
        contents.squares = squares;
        contents.groups = groups;
        contents.output_grad = Some(output_grad);
    }

    /// The output gradient the backward step left (see
    /// [`ConvSink::output_grad`]); panics if there is none, which that
    /// method checks first.
    pub(crate) fn flex_output_grad(&self) -> burn::backend::flex::FlexTensor {
        self.lock()
            .output_grad
            .clone()
            .expect("ConvSink::output_grad checks that there is one")
    }
}

/// Where a fast batch normalization's backward step leaves the scale's and
/// shift's gradients summed over each normalization group's examples
/// alone, `Σ dy x̂` and `Σ dy` per group and channel (the sums its input
/// gradient needs anyway): with ghost batch norm, the gradients of
/// micro-batches made of whole ghost batches, from one pass. Shared by
/// clones; empty until the backward step runs.
#[derive(Debug, Clone, Default)]
pub struct NormSink(Arc<Mutex<Option<NormGroupGrads>>>);

/// The per-group gradients a [`NormSink`] holds.
#[derive(Debug, Clone, PartialEq)]
pub struct NormGroupGrads {
    /// Normalization groups.
    pub groups: usize,
    /// `Σ dy x̂` per group and channel, `[groups, C]`.
    pub gamma: Vec<f32>,
    /// `Σ dy` per group and channel, `[groups, C]`.
    pub beta: Vec<f32>,
}

impl NormSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The per-group gradients the backward step left, if it ran.
    pub fn groups(&self) -> Option<NormGroupGrads> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn put(&self, groups: usize, gamma: Vec<f32>, beta: Vec<f32>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(NormGroupGrads {
            groups,
            gamma,
            beta,
        });
    }
}

static ENABLED: AtomicBool = AtomicBool::new(true);
static POISON: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's override of [`ENABLED`] (see [`with_enabled`]).
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
    /// One unfolded example per thread, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Turns the fast kernels on or off for the whole process (on by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`conv2d`] and [`batch_norm`] use the fast kernels on this
/// thread where they apply.
pub fn enabled() -> bool {
    OVERRIDE
        .with(Cell::get)
        .unwrap_or_else(|| ENABLED.load(Ordering::Relaxed))
}

/// Runs `f` with the fast kernels on or off on the calling thread only
/// (other threads, such as parallel tests, keep their setting), restoring
/// the previous setting afterwards, also when `f` panics.
pub fn with_enabled<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(on))));
    f()
}

/// Fills every buffer the kernels allocate for an output (and their
/// scratch space) with NaN instead of 0 before the kernel writes it, so
/// that a test sees any element a kernel fails to write. Off by default;
/// for tests only.
#[doc(hidden)]
pub fn poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// What a new output buffer holds before a kernel writes it: zeros, or NaN
/// when poisoned.
fn output_fill() -> f32 {
    if POISON.load(Ordering::Relaxed) {
        f32::NAN
    } else {
        0.0
    }
}

/// A new output buffer: zeros, or NaN when poisoned.
fn output_buffer(len: usize) -> Vec<f32> {
    vec![output_fill(); len]
}

/// A new output buffer of `len` values in items of `item_len` values (the
/// last may be shorter), item `n` written by `write(n, item)`; the items
/// run in tasks of `per_task` consecutive items, in parallel when
/// `parallel`. Each item is zeroed
/// (NaN when poisoned) by the thread that then writes it, just before
/// `write` runs: no serial pass over the whole buffer on the calling
/// thread, and the item is in that thread's cache when it is written
/// (zeroing a batch's activations up front took about a twelfth of a
/// ResNet-20 step at batch 128, on one thread while the others waited).
fn output_items(
    len: usize,
    item_len: usize,
    per_task: usize,
    parallel: bool,
    write: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    let fill = output_fill();
    let item_len = item_len.max(1);
    let mut out: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` values need no initialization.
    unsafe { out.set_len(len) };
    if len == 0 {
        return Vec::new();
    }
    let task_len = per_task.max(1) * item_len;
    let task = |(t, chunk): (usize, &mut [MaybeUninit<f32>])| {
        for (e, item) in chunk.chunks_mut(item_len).enumerate() {
            if fill.to_bits() == 0 {
                // SAFETY: all-zero bytes are the `f32` 0.0, and the range is
                // the item's own. (memset: the loop below runs on 16-byte
                // stores where the crate is built for baseline x86-64.)
                unsafe { std::ptr::write_bytes(item.as_mut_ptr(), 0, item.len()) };
            } else {
                for v in item.iter_mut() {
                    v.write(fill);
                }
            }
            // SAFETY: every value of the item was just written, and
            // `MaybeUninit<f32>` has the layout of `f32`.
            let item = unsafe { &mut *(item as *mut [MaybeUninit<f32>] as *mut [f32]) };
            write(t * per_task.max(1) + e, item);
        }
    };
    if parallel {
        out.par_chunks_mut(task_len).enumerate().for_each(task);
    } else {
        out.chunks_mut(task_len).enumerate().for_each(task);
    }
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: every item was initialized above (a panic in `write` unwinds
    // out of this function before here, dropping the `MaybeUninit`
    // vector), and the pointer, length and capacity are the vector's own.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), len, out.capacity()) }
}

/// Values per item of [`zeroed_output`]: 256 KiB.
const ZEROED_BLOCK: usize = 64 * 1024;

/// A new output buffer of `len` zeros (NaN when poisoned) for one product
/// to write whole, zeroed in blocks over the threads: the first touch of a
/// large buffer's pages (page faults, the kernel's clearing) then runs on
/// all of them rather than on the calling thread alone (on the MLP's
/// penalty steps the calling thread's page faults and memset took about a
/// fifth of the samples while the workers waited).
fn zeroed_output(len: usize) -> Vec<f32> {
    output_items(len, ZEROED_BLOCK, 1, len > ZEROED_BLOCK, |_, _| {})
}

/// Runs `f` on this thread's scratch buffer of `len` values (contents
/// unspecified: NaN when poisoned), or on a fresh one when the thread's is
/// already in use (a re-entrant call through a rayon join).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let poison = POISON.load(Ordering::Relaxed);
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            if poison {
                buf[..len].fill(f32::NAN);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut output_buffer(len)),
    })
}

/// Whether `device` is flex, with or without autodiff.
pub fn is_flex(device: &Device) -> bool {
    match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Fewest output positions per example and channel for the fast
/// convolution. The kernels run one product per example, which below this
/// (VGG's 4x4 and 2x2 stages) is too thin for gemm: there burn's op, which
/// multiplies over the whole batch at once, is faster (VGG-11 at batch 16
/// took 1.6 times as long on the per-example products).
pub const MIN_POSITIONS: usize = 64;

/// `burn::tensor::module::max_pool2d(x, options)` for `x` `[B, C, H, W]`,
/// on covnoise's fast kernel where it applies (enabled on this thread,
/// flex, `f32`, dilation 1, floor mode, the same padding on both sides of
/// a dimension and at most half the window), burn's op otherwise. The
/// same values and gradient: each output takes the first maximum of its
/// window in row-major order (a NaN wins), and its gradient goes there.
pub fn max_pool2d(x: Tensor<4>, options: MaxPoolOptions<2>) -> Tensor<4> {
    let [(pt, pb), (pl, pr)] = options.padding;
    let [b, c, h, w] = x.dims();
    let shape = pool::PoolShape {
        planes: b * c,
        height: h,
        width: w,
        kernel: options.kernel_size,
        stride: options.stride,
        padding: [pt, pl],
    };
    let fast = enabled()
        && x.dtype() == DType::F32
        && options.dilation == [1, 1]
        && !options.ceil_mode
        && pt == pb
        && pl == pr
        && b * c * h * w > 0
        && shape.output_size().is_some()
        && is_flex(&x.device());
    if !fast {
        return burn::tensor::module::max_pool2d(x, options);
    }
    Tensor::from_dispatch(<Dispatch as FastKernels>::fast_max_pool2d(
        x.into_dispatch(),
        options.kernel_size,
        options.stride,
        [pt, pl],
    ))
}

/// `burn::tensor::activation::relu(x)`, on covnoise's fast kernel where it
/// applies (enabled on this thread, flex, `f32`), burn's op otherwise. The
/// same values and gradient (a NaN passes through, and so does its
/// gradient), spread over the threads: burn's flex backend runs it, and
/// its gradient, on the calling thread alone.
pub fn relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let fast = enabled() && x.dtype() == DType::F32 && is_flex(&x.device());
    if !fast {
        return burn::tensor::activation::relu(x);
    }
    Tensor::from_dispatch(<Dispatch as FastKernels>::fast_relu(x.into_dispatch()))
}

/// `relu(a + b)` for `a` and `b` of one shape (a residual sum and the
/// ReLU after it), on covnoise's fast kernel where it applies (enabled on
/// this thread, flex, `f32`, equal shapes), burn's ops otherwise. burn's
/// values and gradients (the sum rounded to `f32`, then the ReLU): one
/// pass over the threads, where burn's flex adds on the calling thread and
/// then runs the ReLU.
pub fn add_relu<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    let fast = enabled()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.dims() == b.dims()
        && is_flex(&a.device())
        && is_flex(&b.device());
    if !fast {
        return burn::tensor::activation::relu(a + b);
    }
    Tensor::from_dispatch(<Dispatch as FastKernels>::fast_add_relu(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

/// The products `a_gᵀ d_g` of consecutive groups of `rows` rows of `a`
/// `[R, i]` and `d` `[R, o]` (R a multiple of `rows`), `[R / rows, i o]`:
/// a Linear layer's weight gradients per micro-batch, on the fast kernel
/// (one gemm per group, the groups spread over the threads). None where
/// the kernel does not run (disabled on this thread, another backend than
/// flex, not `f32`, shapes that do not split into groups): the caller then
/// uses burn's batched matmul.
pub fn group_outer(a: &Tensor<2>, d: &Tensor<2>, rows: usize) -> Option<Tensor<2>> {
    let ([r, i], [r_d, o]) = (a.dims(), d.dims());
    let ok = enabled()
        && a.dtype() == DType::F32
        && d.dtype() == DType::F32
        && rows > 0
        && r == r_d
        && r.is_multiple_of(rows)
        && r * i * o > 0
        && is_flex(&a.device());
    ok.then(|| {
        Tensor::from_dispatch(<Dispatch as FastKernels>::fast_group_outer(
            a.clone().into_dispatch(),
            d.clone().into_dispatch(),
            rows,
        ))
    })
}

/// `(a²)ᵀ(d²)` `[i, o]` for `a` `[R, i]` and `d` `[R, o]`: the sum over
/// the rows of the squared outer products, which for a Linear layer's
/// input `a` and output gradient `d` (one position per example) is the
/// sum over the examples of the squared per-example weight gradients
/// (BackPACK's shortcut). On the fast kernel the squares are formed on
/// the threads and the product runs on all of them (burn's flex squares
/// on the calling thread). None where it does not run (disabled on this
/// thread, another backend than flex, not `f32`, shapes that do not
/// match, empty operands): the caller then uses burn's ops.
pub fn squared_outer(a: &Tensor<2>, d: &Tensor<2>) -> Option<Tensor<2>> {
    let ([r, i], [r_d, o]) = (a.dims(), d.dims());
    let ok = enabled()
        && a.dtype() == DType::F32
        && d.dtype() == DType::F32
        && r == r_d
        && r * i * o > 0
        && is_flex(&a.device())
        && is_flex(&d.device());
    ok.then(|| {
        Tensor::from_dispatch(<Dispatch as FastKernels>::fast_squared_outer(
            a.clone().into_dispatch(),
            d.clone().into_dispatch(),
        ))
    })
}

/// `x W` for `x` `[R, i]` and `weight` `[i, o]`: a Linear layer's
/// product, differentiable in both. On the fast kernel (enabled on this
/// thread, flex, `f32`, non-empty operands) the forward product and the
/// backward step's two products (`dy Wᵀ` and `xᵀ dy`, each formed only
/// where its operand takes a gradient) run on all threads into outputs
/// zeroed there; the MLP's plain step at batch 4,096 ran 6-22 % faster
/// than on burn's flex matmul and its autodiff step, back to back
/// (RESULTS.md section 21). Elsewhere burn's `matmul`.
pub fn linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    let r = x.dims()[0];
    if !linear_grouped_applies(&x, &weight, r.max(1)) {
        return x.matmul(weight);
    }
    Tensor::from_dispatch(<Dispatch as FastKernels>::fast_linear(
        x.into_dispatch(),
        weight.into_dispatch(),
    ))
}

/// `layer.forward(x)` for a burn `Linear` on `x` `[..., in]`, through
/// [`linear`] where the fast kernel applies: the leading dimensions are
/// flattened into rows, the bias added to each. Elsewhere (another device
/// or dtype, a one-dimensional `x`, or one whose last dimension is not the
/// layer's input) burn's `forward` itself (which checks the shape).
pub fn linear_layer<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let weight = layer.weight.val();
    let rows: usize = dims[..D.saturating_sub(1)].iter().product();
    if D < 2 || !linear_applies([rows, dims[D - 1]], x.dtype(), &x.device(), &weight, 1) {
        return layer.forward(x);
    }
    let mut z = linear(x.reshape([rows, dims[D - 1]]), weight);
    if let Some(bias) = &layer.bias {
        z = z + bias.val().unsqueeze();
    }
    let mut out = dims;
    out[D - 1] = z.dims()[1];
    z.reshape(out)
}

/// Whether [`linear_grouped`] runs for these operands: enabled on this
/// thread, flex, `f32`, `x` `[R, i]` and `weight` `[i, o]` non-empty, and
/// R a multiple of `rows`.
pub fn linear_grouped_applies(x: &Tensor<2>, weight: &Tensor<2>, rows: usize) -> bool {
    linear_applies(x.dims(), x.dtype(), &x.device(), weight, rows)
}

/// [`linear_grouped_applies`] for an `x` of these dims, dtype and device.
fn linear_applies(
    [r, i]: [usize; 2],
    dtype: DType,
    device: &Device,
    weight: &Tensor<2>,
    rows: usize,
) -> bool {
    let [i_w, o] = weight.dims();
    enabled()
        && dtype == DType::F32
        && weight.dtype() == DType::F32
        && i == i_w
        && rows > 0
        && r.is_multiple_of(rows)
        && r * i * o > 0
        && is_flex(device)
        && is_flex(&weight.device())
}

/// `x W` for `x` `[R, i]` and `weight` `[i, o]` whose backward step (on
/// `Autodiff<Flex>`) forms the products `x_gᵀ dy_g` of the consecutive
/// groups of `rows` rows (micro-batches) and leaves in `sink` the output
/// gradient and those groups' weight gradients (a sink made by
/// [`ConvSink::grouped`]) or their sum and centered sum of squares
/// ([`ConvSink::summarized`], without a `[G, i, o]` buffer): a Linear
/// layer's micro-batch gradients at the cost of its batch gradient's
/// products. With `weight_grad` the weight's gradient is registered as
/// the groups' sum; without it (a frozen copy's weight, tracked only so
/// that the step runs) it is not. A sink made by [`ConvSink::new`] (a
/// pass of the per-example estimators) gets the output gradient alone,
/// and the weight's gradient is the batch's single product `xᵀ dy`; `rows`
/// then only has to divide R. Only where [`linear_grouped_applies`]
/// (checked: panics otherwise).
pub fn linear_grouped(
    x: Tensor<2>,
    weight: Tensor<2>,
    rows: usize,
    weight_grad: bool,
    sink: ConvSink,
) -> Tensor<2> {
    assert!(
        linear_grouped_applies(&x, &weight, rows),
        "linear_grouped runs where linear_grouped_applies"
    );
    Tensor::from_dispatch(<Dispatch as FastKernels>::fast_linear_grouped(
        x.into_dispatch(),
        weight.into_dispatch(),
        rows,
        weight_grad,
        sink,
    ))
}

/// `Σ_j (t_j - m)²` `[n]` over the rows `t_j` of `t` `[G, n]` (group
/// gradients around their mean `m` `[n]`), in one read of `t` on the fast
/// kernel. None where it does not run (disabled on this thread, another
/// backend than flex, not `f32`, shapes that do not match): the caller
/// then uses burn's ops.
pub fn centered_square_sum(t: &Tensor<2>, m: &Tensor<1>) -> Option<Tensor<1>> {
    let ([g, n], [n_m]) = (t.dims(), m.dims());
    let ok = enabled()
        && t.dtype() == DType::F32
        && m.dtype() == DType::F32
        && g > 0
        && n > 0
        && n == n_m
        && is_flex(&t.device())
        && is_flex(&m.device());
    ok.then(|| {
        Tensor::from_dispatch(<Dispatch as FastKernels>::fast_centered_squares(
            t.clone().into_dispatch(),
            m.clone().into_dispatch(),
        ))
    })
}

/// The mean of the rows of `t` `[G, n]`, `[n]` (the mean of group
/// gradients), spread over the threads on the fast kernel (burn's flex
/// `mean_dim` runs on the calling thread). None where it does not run
/// (disabled on this thread, another backend than flex, not `f32`, an
/// empty `t`): the caller then uses burn's ops.
pub fn row_mean(t: &Tensor<2>) -> Option<Tensor<1>> {
    over_rows(t, <Dispatch as FastKernels>::fast_row_mean)
}

/// `op` on the fast kernel for a non-empty `f32` flex `t` `[G, n]` (with
/// the kernels enabled on this thread), else None.
fn over_rows(
    t: &Tensor<2>,
    op: impl FnOnce(FloatTensor<Dispatch>) -> FloatTensor<Dispatch>,
) -> Option<Tensor<1>> {
    let [g, n] = t.dims();
    let ok = enabled() && t.dtype() == DType::F32 && g > 0 && n > 0 && is_flex(&t.device());
    ok.then(|| Tensor::from_dispatch(op(t.clone().into_dispatch())))
}

/// The mean of the rows of `t` `[G, n]` (`[n]`, as [`row_mean`]) and each
/// row's `Σ_c t[g, c]²` (`[G]`, as [`row_square_sums`]) from one read of
/// `t` on the fast kernel: the mean of group gradients and their squared
/// norms, where a step needs both. None where it does not run (disabled
/// on this thread, another backend than flex, not `f32`, an empty `t`):
/// the caller then uses burn's ops.
pub fn row_mean_and_square_sums(t: &Tensor<2>) -> Option<(Tensor<1>, Tensor<1>)> {
    let [g, n] = t.dims();
    let both = over_rows(t, <Dispatch as FastKernels>::fast_row_mean_and_squares)?;
    Some((both.clone().narrow(0, 0, n), both.narrow(0, n, g)))
}

/// `Σ_g w_g t[g, c]` `[n]` for `t` `[G, n]` and one weight per row
/// (a weighted sum of group gradients), in one read of `t` on the fast
/// kernel. None where it does not run (disabled on this thread, another
/// backend than flex, not `f32`, an empty `t`): the caller then uses
/// burn's ops.
///
/// # Panics
/// If `w` does not hold one weight per row of `t`.
pub fn weighted_row_sum(t: &Tensor<2>, w: &[f32]) -> Option<Tensor<1>> {
    let [g, _] = t.dims();
    assert_eq!(w.len(), g, "one weight per row of t [{g}, n]");
    over_rows(t, |rows| {
        let w = crate::tensor_util::from_vec(w.to_vec(), [g], &t.device());
        <Dispatch as FastKernels>::fast_weighted_row_sum(rows, w.into_dispatch())
    })
}

/// `Σ_c t[g, c]²` `[G]` for each row of `t` `[G, n]` (the squared norms
/// of group gradients), in one read of `t` on the fast kernel, without the
/// squared copy that `t.square().sum_dim(1)` writes. None where it does
/// not run (disabled on this thread, another backend than flex, not
/// `f32`, an empty `t`): the caller then uses burn's ops.
pub fn row_square_sums(t: &Tensor<2>) -> Option<Tensor<1>> {
    over_rows(t, <Dispatch as FastKernels>::fast_row_squares)
}

/// `Σ_r t[r, c]²` `[n]` over the rows of `t` `[R, n]` (a Linear layer's
/// squared per-example bias gradients summed, from its output gradient),
/// in one read of `t` on the fast kernel, without the squared copy that
/// `t.square().sum_dim(0)` writes. None where it does not run (disabled
/// on this thread, another backend than flex, not `f32`, an empty `t`):
/// the caller then uses burn's ops.
pub fn column_square_sums(t: &Tensor<2>) -> Option<Tensor<1>> {
    over_rows(t, <Dispatch as FastKernels>::fast_column_squares)
}

/// `x_j (W + f_j S_j)` for the G consecutive groups of rows of `x` `[R,
/// i]` (R a multiple of G), `weight` `[i, o]`, the constants `shift` `[G,
/// i, o]` and the groups' `factors` f_j: `[R, o]`, a Linear layer's product with each group of rows at its
/// own weight (a penalty's moved parameters, one set per micro-batch;
/// [`crate::probes::GroupShifts`]). Differentiable in `x` and `weight`; the
/// weight's gradient is the batch's single product `xᵀ dy`. On the fast
/// kernel (one product per group, each group's weight formed just before
/// it; see the module `shifted`) where it runs (enabled, flex, `f32`);
/// elsewhere burn's ops, `x W` plus one batched product with the shifts.
pub fn linear_per_group(
    x: Tensor<2>,
    weight: Tensor<2>,
    shift: Tensor<3>,
    factors: &[f32],
) -> Tensor<2> {
    let ([r, i], [i_w, o], [g, i_s, o_s]) = (x.dims(), weight.dims(), shift.dims());
    assert!(
        i == i_w && i == i_s && o == o_s && g >= 1 && r.is_multiple_of(g) && factors.len() == g,
        "x [{r}, {i}], weight [{i_w}, {o}] and shift [{g}, {i_s}, {o_s}] do not make {g} groups of rows"
    );
    let fast = enabled()
        && [x.dtype(), weight.dtype(), shift.dtype()] == [DType::F32; 3]
        && r * i * o > 0
        && is_flex(&x.device())
        && is_flex(&weight.device());
    if !fast {
        let column = Tensor::<3>::from_data(
            burn::tensor::TensorData::new(factors.to_vec(), [g, 1, 1]),
            &shift.device(),
        );
        let extra = x.clone().reshape([g, r / g, i]).matmul(shift * column);
        return x.matmul(weight) + extra.reshape([r, o]);
    }
    Tensor::from_dispatch(<Dispatch as FastKernels>::fast_linear_shifted(
        x.into_dispatch(),
        weight.into_dispatch(),
        shift.into_dispatch(),
        factors.to_vec(),
    ))
}

/// Whether [`conv2d`] runs the fast kernel for these operands (else burn's
/// op): enabled on this thread, flex, `f32`, groups 1, dilation 1, and at
/// least [`MIN_POSITIONS`] output positions.
pub fn conv2d_is_fast(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: &ConvOptions<2>,
) -> bool {
    let [b, c_in, h, w] = x.dims();
    let [c_out, c_in_w, kh, kw] = weight.dims();
    let f32s = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32 && b.dims() == [c_out]);
    let shape = ConvShape {
        batch: b,
        c_in,
        height: h,
        width: w,
        c_out,
        kernel: [kh, kw],
        stride: options.stride,
        padding: options.padding,
    };
    enabled()
        && f32s
        && options.groups == 1
        && options.dilation == [1, 1]
        && c_in == c_in_w
        && b * c_in * c_out * kh * kw > 0
        && shape
            .output_size()
            .is_some_and(|[ho, wo]| ho * wo >= MIN_POSITIONS)
        && is_flex(&x.device())
        && is_flex(&weight.device())
        && bias.is_none_or(|b| is_flex(&b.device()))
}

/// burn's `conv2d` (`burn::tensor::module::conv2d`): `x` `[B, C_in, H, W]`,
/// `weight` `[C_out, C_in / groups, kh, kw]`, `bias` `[C_out]`; on the fast
/// kernels where [`conv2d_is_fast`] says so, burn's op otherwise.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    conv2d_recording(x, weight, bias, options, None)
}

/// [`conv2d`], whose backward step (where the fast kernel runs, on
/// `Autodiff<Flex>`) also leaves in `sink` its output gradient and what the
/// sink asks of the per-example weight and bias gradients of the objective
/// it differentiates (see [`ConvSink`]). Where burn's op
/// runs instead, `sink` stays empty.
pub fn conv2d_recording(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
    sink: Option<ConvSink>,
) -> Tensor<4> {
    if !conv2d_is_fast(&x, &weight, bias.as_ref(), &options) {
        return burn::tensor::module::conv2d(x, weight, bias, options);
    }
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    let (stride, padding) = (options.stride, options.padding);
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as FastKernels>::fast_conv2d_bias(
            x,
            weight,
            b.into_dispatch(),
            stride,
            padding,
            1,
            sink,
        ),
        None => <Dispatch as FastKernels>::fast_conv2d(x, weight, stride, padding, 1, sink),
    })
}

/// A convolution whose batch comes in G consecutive groups of examples,
/// each convolved with a weight and bias of its own: `x` `[B, C_in, H, W]`
/// (B a multiple of G), `weight` `[G, C_out, C_in / groups, kh, kw]`,
/// `bias` `[G, C_out]`; examples `j B/G .. (j + 1) B/G` meet `weight[j]`
/// and `bias[j]`, with burn's `options`. Differentiable in all three: each
/// group's weight takes its own group's gradient. This is how one pass
/// runs each micro-batch at parameters of its own (a penalty's finite
/// differences, [`crate::probes::GroupShifts`]). On the fast kernels where
/// [`conv2d_is_fast`] holds for one group's operands (one product per
/// example, the weight chosen by the example's group); elsewhere burn's op
/// once per group.
pub fn conv2d_per_group(
    x: Tensor<4>,
    weight: Tensor<5>,
    bias: Option<Tensor<2>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    let [g, c_out, c_in, kh, kw] = weight.dims();
    let batch = x.dims()[0];
    assert!(
        g >= 1 && batch.is_multiple_of(g),
        "{g} weight groups cannot split a batch of {batch}"
    );
    let per = batch / g;
    let one = |w: &Tensor<5>, j: usize| w.clone().narrow(0, j, 1).reshape([c_out, c_in, kh, kw]);
    let one_bias = |b: &Tensor<2>, j: usize| b.clone().narrow(0, j, 1).reshape([c_out]);
    let first = one(&weight, 0);
    let first_bias = bias.as_ref().map(|b| one_bias(b, 0));
    let head = x.clone().narrow(0, 0, per);
    if g == 1 || !conv2d_is_fast(&head, &first, first_bias.as_ref(), &options) {
        let outs = (0..g)
            .map(|j| {
                burn::tensor::module::conv2d(
                    x.clone().narrow(0, j * per, per),
                    one(&weight, j),
                    bias.as_ref().map(|b| one_bias(b, j)),
                    options.clone(),
                )
            })
            .collect();
        return Tensor::cat(outs, 0);
    }
    let weight = weight.reshape([g * c_out, c_in, kh, kw]).into_dispatch();
    let (x, stride, padding) = (x.into_dispatch(), options.stride, options.padding);
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as FastKernels>::fast_conv2d_bias(
            x,
            weight,
            b.reshape([g * c_out]).into_dispatch(),
            stride,
            padding,
            g,
            None,
        ),
        None => <Dispatch as FastKernels>::fast_conv2d(x, weight, stride, padding, g, None),
    })
}

/// `layer.forward(x)` for a burn `Conv2d`, through [`conv2d`]: the same
/// padding (burn's `Same` may be asymmetric), stride, dilation and groups.
pub fn conv2d_layer(layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let options = layer_options(layer, &x);
    conv2d(
        x,
        layer.weight.val(),
        layer.bias.as_ref().map(|b| b.val()),
        options,
    )
}

/// The options of burn's `conv2d` that `layer` applies to images `x`
/// `[B, C, H, W]` (its padding as explicit pairs).
pub(crate) fn layer_options(layer: &Conv2d, x: &Tensor<4>) -> ConvOptions<2> {
    let [_, _, h, w] = x.dims();
    let padding = padding_pairs(&layer.padding, [h, w], layer.kernel_size, layer.stride);
    ConvOptions::new_with_padding(layer.stride, padding, layer.dilation, layer.groups)
}

/// The zero padding burn's `Conv2d` applies for `config` to an input of
/// spatial size `[h, w]` (`Same` may be asymmetric), as `[(top, bottom),
/// (left, right)]`.
pub(crate) fn padding_pairs(
    config: &PaddingConfig2d,
    [h, w]: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
) -> [(usize, usize); 2] {
    match config {
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Same => [
            same_padding(h, kernel[0], stride[0]),
            same_padding(w, kernel[1], stride[1]),
        ],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(*top, *bottom), (*left, *right)],
    }
}

/// TensorFlow's "same" padding of one dimension, as burn computes it: the
/// output has ceil(size / stride) positions; `(before, after)`.
pub(crate) fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out.max(1) - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// Batch normalization's training-mode output and batch statistics.
#[derive(Debug, Clone)]
pub struct BatchNormOutput {
    /// The normalized, scaled and shifted input `[B, C, H, W]`.
    pub output: Tensor<4>,
    /// Batch mean per group and channel `[groups, C]` (outside the graph).
    pub mean: Tensor<2>,
    /// Biased batch variance per group and channel `[groups, C]` (outside
    /// the graph).
    pub var: Tensor<2>,
}

/// Batch normalization of `x` `[B, C, H, W]` in training mode over
/// `groups` consecutive groups of examples, in PyTorch's semantics (biased
/// variance, `(x - mean) / sqrt(var + eps) gamma + beta`), differentiable
/// in `x`, `gamma` and `beta`; None where the kernel does not apply (not
/// enabled, not flex, not `f32`, groups not dividing the batch, fewer than
/// 2 values per group, or feature vectors, `H W = 1`: the kernel walks one
/// channel plane at a time, which for single values costs more than burn's
/// reductions), for the caller to use burn's ops.
pub fn batch_norm(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
) -> Option<BatchNormOutput> {
    batch_norm_recording(x, gamma, beta, groups, eps, None)
}

/// Whether [`batch_norm`] runs its kernel for these operands (a scale and
/// shift `[C]`, or `[groups C]`, one per normalization group).
pub fn batch_norm_applies(
    x: &Tensor<4>,
    gamma: &Tensor<1>,
    beta: &Tensor<1>,
    groups: usize,
) -> bool {
    let [b, c, h, w] = x.dims();
    enabled()
        && groups >= 1
        && b.is_multiple_of(groups)
        && (b / groups) * h * w >= 2
        && h * w >= 2
        && c > 0
        && (gamma.dims() == [c] || gamma.dims() == [groups * c])
        && beta.dims() == gamma.dims()
        && [x.dtype(), gamma.dtype(), beta.dtype()] == [DType::F32; 3]
        && is_flex(&x.device())
        && is_flex(&gamma.device())
        && is_flex(&beta.device())
}

/// [`batch_norm`], whose backward step (on `Autodiff<Flex>`) also leaves in
/// `sink` the scale's and shift's gradients per normalization group (see
/// [`NormSink`]).
pub fn batch_norm_recording(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    sink: Option<NormSink>,
) -> Option<BatchNormOutput> {
    if !batch_norm_applies(&x, &gamma, &beta, groups) {
        return None;
    }
    let (output, mean, var) = <Dispatch as FastKernels>::fast_batch_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        groups,
        eps,
        sink,
    );
    Some(BatchNormOutput {
        output: Tensor::from_dispatch(output),
        mean: Tensor::from_dispatch(mean),
        var: Tensor::from_dispatch(var),
    })
}
