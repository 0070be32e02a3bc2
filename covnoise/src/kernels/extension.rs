//! The backend extension: [`FastKernels`], implemented for burn's flex
//! backend (the forward kernels) and for `Autodiff<Flex>` (the forward
//! kernels plus hand-written backward steps), reached from `Tensor<D>`
//! through burn's `Dispatch` (`#[backend_extension]`).

use burn::backend::TensorMetadata;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, backend_extension};
use burn::tensor::{DType, TensorData};

use super::conv::{self, ConvShape, GradGroups};
use super::norm::{self, NormShape};
use super::outer;
use super::pool::{self, PoolShape};
use super::relu;
use super::shifted::{self, ShiftedShape};
use super::{ConvSink, GroupMomentSums, NormSink};

/// Fast convolution and batch normalization for the flex backend, with
/// and without autodiff.
///
/// Call it through [`super::conv2d`] and [`super::batch_norm`], which check
/// that the kernels cover the configuration and fall back to burn's ops
/// otherwise: calling it on another backend panics (burn's dispatch has no
/// route for it).
#[backend_extension(Flex, Autodiff)]
pub trait FastKernels: Backend {
    /// `x` `[B, C_in, H, W]` convolved with `weight` `[C_out, C_in, kh,
    /// kw]`, groups 1, dilation 1, `f32`, no bias. With `example_groups`
    /// G above 1, `weight` is `[G C_out, C_in, kh, kw]`: G weights, the
    /// j-th for the j-th of G consecutive groups of examples (then without
    /// a sink). With a `sink`, the backward step (on `Autodiff<Flex>`) also
    /// leaves there its output gradient and the sums over the examples of
    /// the squared per-example weight and bias gradients of the objective
    /// it differentiates.
    fn fast_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [(usize, usize); 2],
        example_groups: usize,
        sink: Option<ConvSink>,
    ) -> FloatTensor<Self>;

    /// [`FastKernels::fast_conv2d`] plus `bias` `[C_out]` (`[G C_out]`
    /// with G example groups; a method of its own: the extension macro
    /// routes tensors, not optional tensors).
    fn fast_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [(usize, usize); 2],
        example_groups: usize,
        sink: Option<ConvSink>,
    ) -> FloatTensor<Self>;

    /// The output gradient a fast convolution's backward step left in
    /// `sink` (which must hold one), as a tensor of this backend without
    /// autodiff graph; `like` (any tensor of the backend) routes the call.
    fn fast_sunk_output_grad(like: FloatTensor<Self>, sink: ConvSink) -> FloatTensor<Self>;

    /// `a_gᵀ d_g` for the consecutive groups of `rows` rows of `a` `[R, i]`
    /// and `d` `[R, o]`, `[R / rows, i o]`, without autodiff graph (see
    /// [`super::group_outer`]).
    fn fast_group_outer(
        a: FloatTensor<Self>,
        d: FloatTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self>;

    /// `(a²)ᵀ(d²)` `[i, o]` for `a` `[R, i]` and `d` `[R, o]`, without
    /// autodiff graph (see [`super::squared_outer`]).
    fn fast_squared_outer(a: FloatTensor<Self>, d: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `Σ_r t[r, c]²` `[n]` over the rows of `t` `[R, n]` (see
    /// [`super::column_square_sums`]); not differentiable.
    fn fast_column_squares(t: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `x_j (W + f_j S_j)` for the G consecutive groups of rows of `x`
    /// `[R, i]`, `weight` `[i, o]`, the constant `shift` `[G, i, o]` and
    /// the groups' `factors`: `[R, o]`, differentiable in `x` and `weight`
    /// (whose gradient is `xᵀ dy`; see [`super::linear_per_group`]).
    fn fast_linear_shifted(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        factors: Vec<f32>,
    ) -> FloatTensor<Self>;

    /// `x w` for `x` `[R, i]` and `weight` `[i, o]`, differentiable in
    /// both. On `Autodiff<Flex>` the backward step forms the products
    /// `x_gᵀ dy_g` of the consecutive groups of `rows` rows, leaves them
    /// (or their sum and centered sum of squares) and the output gradient
    /// `[R, o, 1, 1]` in `sink`, and with `weight_grad` registers their
    /// sum as the weight's gradient; a sink that asks for squares gets the
    /// output gradient alone (see [`super::linear_grouped`]).
    fn fast_linear_grouped(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rows: usize,
        weight_grad: bool,
        sink: ConvSink,
    ) -> FloatTensor<Self>;

    /// `x w` for `x` `[R, i]` and `weight` `[i, o]`, differentiable in
    /// both: a Linear layer's product (see [`super::linear`]), its
    /// backward step the two products `dy wᵀ` and `xᵀ dy`.
    fn fast_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `Σ_j (t_j - m)²` `[n]` over the rows `t_j` of `t` `[G, n]`, for `m`
    /// `[n]`, without autodiff graph (see [`super::centered_square_sum`]).
    fn fast_centered_squares(t: FloatTensor<Self>, m: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `Σ_c t[g, c]²` `[G]` for each row of `t` `[G, n]` (see
    /// [`super::row_square_sums`]); not differentiable.
    fn fast_row_squares(t: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The mean of the rows of `t` `[G, n]`, `[n]` (see
    /// [`super::row_mean`]); not differentiable.
    fn fast_row_mean(t: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The mean of the rows of `t` `[G, n]` followed by each row's
    /// `Σ_c t[g, c]²`: `[n + G]`, from one read of `t` (see
    /// [`super::row_mean_and_square_sums`]); not differentiable.
    fn fast_row_mean_and_squares(t: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `Σ_g w_g t[g, c]` `[n]` for `t` `[G, n]` and `w` `[G]` (see
    /// [`super::weighted_row_sum`]); not differentiable.
    fn fast_weighted_row_sum(t: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Max pooling of `x` `[B, C, H, W]` over `kernel` windows moved by
    /// `stride`, with symmetric `padding`, dilation 1, floor mode,
    /// differentiable in `x` (see [`super::max_pool2d`]).
    fn fast_max_pool2d(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;

    /// `max(x, 0)` elementwise, a NaN passing through, differentiable in
    /// `x` (see [`super::relu()`]).
    fn fast_relu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `max(a + b, 0)` elementwise for `a` and `b` of one shape, a NaN
    /// passing through, differentiable in both (see [`super::add_relu`]).
    fn fast_add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Batch normalization of `x` `[B, C, H, W]` over `groups` consecutive
    /// groups of examples, scaled by `gamma` and shifted by `beta` (`[C]`,
    /// or `[groups C]`: a scale and shift per group):
    /// the output, and the batch mean and biased variance per group and
    /// channel `[groups, C]` (not differentiable). With a `sink`, the
    /// backward step (on `Autodiff<Flex>`) also leaves there the scale's and
    /// shift's gradients per normalization group.
    fn fast_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        sink: Option<NormSink>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// A flex tensor's values as a contiguous `f32` slice owner.
fn contiguous(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "the fast kernels take f32 tensors");
    t.to_contiguous()
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("a contiguous f32 tensor (made by `contiguous`)")
}

fn flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.shape();
    assert_eq!(shape.num_dims(), 4, "a rank-4 tensor");
    [shape[0], shape[1], shape[2], shape[3]]
}

/// The convolution's geometry from its operands' shapes, the weight
/// holding one weight per group of `example_groups` consecutive groups of
/// examples.
fn conv_shape(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: [usize; 2],
    padding: [(usize, usize); 2],
    example_groups: usize,
) -> ConvShape {
    let [batch, c_in, height, width] = dims4(x);
    let [rows, c_in_w, kh, kw] = dims4(weight);
    assert_eq!(c_in, c_in_w, "input channels of x and weight (groups 1)");
    let g = example_groups;
    assert!(
        g >= 1 && rows.is_multiple_of(g) && batch.is_multiple_of(g),
        "{g} example groups for a weight of {rows} rows and a batch of {batch}"
    );
    let c_out = rows / g;
    let shape = ConvShape {
        batch,
        c_in,
        height,
        width,
        c_out,
        kernel: [kh, kw],
        stride,
        padding,
    };
    assert!(
        shape.output_size().is_some(),
        "convolution {shape:?} has no output"
    );
    shape
}

fn flex_conv2d(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    s: &ConvShape,
) -> FlexTensor {
    let (x, weight) = (contiguous(x), contiguous(weight));
    let bias = bias.map(contiguous);
    let out = conv::forward(s, values(&x), values(&weight), bias.as_ref().map(values));
    let [ho, wo] = s.output_size().expect("checked by conv_shape");
    flex(out, vec![s.batch, s.c_out, ho, wo])
}

fn norm_shape(x: &FlexTensor, groups: usize) -> NormShape {
    let [batch, channels, h, w] = dims4(x);
    assert!(
        groups >= 1 && batch.is_multiple_of(groups),
        "{batch} examples cannot form {groups} normalization groups"
    );
    NormShape {
        batch,
        channels,
        spatial: h * w,
        groups,
    }
}

/// The forward pass on flex: output, mean, variance, inverse std, and the
/// mean's rounding residual.
fn flex_batch_norm(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    s: &NormShape,
    eps: f64,
) -> [FlexTensor; 5] {
    let f = norm::forward(s, values(x), values(gamma), values(beta), eps);
    let stats = vec![s.groups, s.channels];
    [
        flex(f.output, x.shape().to_vec()),
        flex(f.mean, stats.clone()),
        flex(f.var, stats.clone()),
        flex(f.inv_std, stats.clone()),
        flex(f.mean_lo, stats),
    ]
}

impl FastKernels for Flex {
    fn fast_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        stride: [usize; 2],
        padding: [(usize, usize); 2],
        example_groups: usize,
        _sink: Option<ConvSink>,
    ) -> FlexTensor {
        // Without autodiff there is no backward step to fill the sink.
        let s = conv_shape(&x, &weight, stride, padding, example_groups);
        flex_conv2d(x, weight, None, &s)
    }

    fn fast_conv2d_bias(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: [usize; 2],
        padding: [(usize, usize); 2],
        example_groups: usize,
        _sink: Option<ConvSink>,
    ) -> FlexTensor {
        let s = conv_shape(&x, &weight, stride, padding, example_groups);
        flex_conv2d(x, weight, Some(bias), &s)
    }

    fn fast_sunk_output_grad(_like: FlexTensor, sink: ConvSink) -> FlexTensor {
        sink.flex_output_grad()
    }

    fn fast_max_pool2d(
        x: FlexTensor,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        let s = pool_shape(&x, kernel, stride, padding);
        flex_max_pool2d(&contiguous(x), &s).0
    }

    fn fast_relu(x: FlexTensor) -> FlexTensor {
        flex_relu(x)
    }

    fn fast_add_relu(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        flex_add_relu(a, b)
    }

    fn fast_linear_shifted(
        x: FlexTensor,
        weight: FlexTensor,
        shift: FlexTensor,
        factors: Vec<f32>,
    ) -> FlexTensor {
        let s = shifted_shape(&x, &weight, &shift);
        let (x, weight, shift) = (contiguous(x), contiguous(weight), contiguous(shift));
        let y = shifted::forward(&s, values(&x), values(&weight), values(&shift), &factors);
        flex(y, vec![s.groups * s.rows, s.o])
    }

    fn fast_linear_grouped(
        x: FlexTensor,
        weight: FlexTensor,
        _rows: usize,
        _weight_grad: bool,
        _sink: ConvSink,
    ) -> FlexTensor {
        // Without autodiff there is no backward step to fill the sink.
        Self::fast_linear(x, weight)
    }

    fn fast_linear(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let (r, i, o) = linear_dims(&x, &weight);
        flex(
            outer::product(values(&x), values(&weight), r, i, o),
            vec![r, o],
        )
    }

    fn fast_row_mean(t: FlexTensor) -> FlexTensor {
        let t = contiguous(t);
        let n = t.shape()[1];
        flex(outer::row_mean(values(&t), n), vec![n])
    }

    fn fast_row_squares(t: FlexTensor) -> FlexTensor {
        let t = contiguous(t);
        let [g, n] = [t.shape()[0], t.shape()[1]];
        flex(outer::row_square_sums(values(&t), n), vec![g])
    }

    fn fast_row_mean_and_squares(t: FlexTensor) -> FlexTensor {
        let t = contiguous(t);
        let [g, n] = [t.shape()[0], t.shape()[1]];
        let (mut mean, squares) = outer::row_mean_and_square_sums(values(&t), n);
        mean.extend(squares);
        flex(mean, vec![n + g])
    }

    fn fast_weighted_row_sum(t: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (t, w) = (contiguous(t), contiguous(w));
        let n = t.shape()[1];
        flex(outer::weighted_row_sum(values(&t), values(&w)), vec![n])
    }

    fn fast_centered_squares(t: FlexTensor, m: FlexTensor) -> FlexTensor {
        let (t, m) = (contiguous(t), contiguous(m));
        let n = m.shape()[0];
        flex(outer::centered_square_sum(values(&t), values(&m)), vec![n])
    }

    fn fast_squared_outer(a: FlexTensor, d: FlexTensor) -> FlexTensor {
        let (a, d) = (contiguous(a), contiguous(d));
        let (r, i, o) = (a.shape()[0], a.shape()[1], d.shape()[1]);
        flex(
            outer::squared_outer(values(&a), values(&d), r, i, o),
            vec![i, o],
        )
    }

    fn fast_column_squares(t: FlexTensor) -> FlexTensor {
        let t = contiguous(t);
        let n = t.shape()[1];
        flex(outer::column_square_sums(values(&t), n), vec![n])
    }

    fn fast_group_outer(a: FlexTensor, d: FlexTensor, rows: usize) -> FlexTensor {
        let (a, d) = (contiguous(a), contiguous(d));
        let (r, i, o) = (a.shape()[0], a.shape()[1], d.shape()[1]);
        let out = outer::group_outer(values(&a), values(&d), rows, i, o);
        flex(out, vec![r / rows, i * o])
    }

    fn fast_batch_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        eps: f64,
        _sink: Option<NormSink>,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let s = norm_shape(&x, groups);
        let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
        let [y, mean, var, _, _] = flex_batch_norm(&x, &gamma, &beta, &s, eps);
        (y, mean, var)
    }
}

/// The backward step of a convolution: what it keeps is its input and
/// weight (as burn's own conv2d does), nothing unfolded; and where the
/// probes asked for them, where to leave the output gradient and the
/// per-example squares.
#[derive(Debug)]
struct ConvBackward;

/// The kept operands of [`ConvBackward`].
#[derive(Debug, Clone)]
struct ConvState {
    x: FlexTensor,
    weight: FlexTensor,
    shape: ConvShape,
    /// Consecutive groups of examples with a weight each (1: one weight).
    example_groups: usize,
    has_bias: bool,
    sink: Option<ConvSink>,
}

impl ConvState {
    /// Registers the gradients of the parents that want one (`ids`: input,
    /// weight and, when present, bias) from the output gradient `dy`, and
    /// leaves the output gradient and the per-example squares in the sink,
    /// if any (also when the
    /// weight itself takes no gradient: the Monte-Carlo Fisher's pass on a
    /// frozen copy of the model).
    fn backward(self, dy: FlexTensor, ids: [Option<NodeId>; 3], grads: &mut Gradients) {
        let dy = contiguous(dy);
        let s = self.shape;
        let [id_x, id_w, id_b] = ids;
        if let Some(id) = id_x {
            let dx = conv::input_grad(&s, values(&self.weight), values(&dy));
            grads.register::<Flex>(id, flex(dx, vec![s.batch, s.c_in, s.height, s.width]));
        }
        if self.example_groups > 1 {
            // One weight per group of examples: each takes its group's
            // gradient, the sums of the grouped weight-gradient products.
            let (g, b) = (self.example_groups, s.batch / self.example_groups);
            if id_w.is_some() || id_b.is_some() {
                let mode = conv::PerExample::Groups(b);
                let grads_g =
                    conv::weight_grad(&s, values(&self.x), values(&dy), id_b.is_some(), mode)
                        .groups
                        .expect("group sums were asked for");
                if let Some(id) = id_w {
                    let [kh, kw] = s.kernel;
                    let shape = vec![g * s.c_out, s.c_in, kh, kw];
                    grads.register::<Flex>(id, flex(grads_g.weight, shape));
                }
                if let Some(id) = id_b {
                    grads.register::<Flex>(id, flex(grads_g.bias, vec![g * s.c_out]));
                }
            }
            return;
        }
        if id_w.is_some() || id_b.is_some() || self.sink.is_some() {
            let mode = self
                .sink
                .as_ref()
                .map_or(conv::PerExample::Nothing, ConvSink::mode);
            let with_bias = id_b.is_some() || (self.has_bias && self.sink.is_some());
            let g = conv::weight_grad(&s, values(&self.x), values(&dy), with_bias, mode);
            if let Some(id) = id_w {
                let [kh, kw] = s.kernel;
                grads.register::<Flex>(id, flex(g.weight, vec![s.c_out, s.c_in, kh, kw]));
            }
            if let Some(id) = id_b {
                grads.register::<Flex>(id, flex(g.bias, vec![s.c_out]));
            }
            if let Some(sink) = self.sink {
                sink.put(g.squares, g.groups, dy);
            }
        }
    }
}

impl Backward<Flex, 2> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<ConvState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let [x, w] = ops.parents.map(|p| p.map(|n| n.id));
        ops.state.backward(dy, [x, w, None], grads);
    }
}

impl Backward<Flex, 3> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<ConvState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let ids = ops.parents.map(|p| p.map(|n| n.id));
        ops.state.backward(dy, ids, grads);
    }
}

/// The backward step of batch normalization: it keeps the input and the
/// per-group mean and inverse standard deviation.
#[derive(Debug)]
struct NormBackward;

/// The kept values of [`NormBackward`].
#[derive(Debug, Clone)]
struct NormState {
    x: FlexTensor,
    gamma: FlexTensor,
    mean: FlexTensor,
    mean_lo: FlexTensor,
    inv_std: FlexTensor,
    shape: NormShape,
    sink: Option<NormSink>,
}

impl Backward<Flex, 3> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<NormState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pgamma, pbeta] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let st = ops.state;
        let g = norm::backward(
            &st.shape,
            values(&st.x),
            values(&dy),
            values(&st.gamma),
            [values(&st.mean), values(&st.mean_lo)],
            values(&st.inv_std),
        );
        let c = st.shape.channels;
        if let Some(p) = px {
            grads.register::<Flex>(p.id, flex(g.dx, st.x.shape().to_vec()));
        }
        // A scale and shift given per normalization group take each group's
        // own sums.
        let per_group = values(&st.gamma).len() != c;
        let gc = st.shape.groups * c;
        if let Some(p) = pgamma {
            let dgamma = if per_group {
                flex(g.group_dgamma.clone(), vec![gc])
            } else {
                flex(g.dgamma, vec![c])
            };
            grads.register::<Flex>(p.id, dgamma);
        }
        if let Some(p) = pbeta {
            let dbeta = if per_group {
                flex(g.group_dbeta.clone(), vec![gc])
            } else {
                flex(g.dbeta, vec![c])
            };
            grads.register::<Flex>(p.id, dbeta);
        }
        if let Some(sink) = st.sink {
            sink.put(st.shape.groups, g.group_dgamma, g.group_dbeta);
        }
    }
}

/// The shifted product's shape from its operands' shapes.
fn shifted_shape(x: &FlexTensor, weight: &FlexTensor, shift: &FlexTensor) -> ShiftedShape {
    let (xs, ws, ss) = (x.shape(), weight.shape(), shift.shape());
    assert!(
        xs.num_dims() == 2 && ws.num_dims() == 2 && ss.num_dims() == 3,
        "x [R, i], weight [i, o], shift [G, i, o]"
    );
    let (r, i, o, g) = (xs[0], ws[0], ws[1], ss[0]);
    assert!(
        xs[1] == i && ss[1] == i && ss[2] == o && g >= 1 && r.is_multiple_of(g),
        "x {:?}, weight {:?} and shift {:?} do not make G groups of rows",
        xs.to_vec(),
        ws.to_vec(),
        ss.to_vec()
    );
    ShiftedShape {
        rows: r / g,
        groups: g,
        i,
        o,
    }
}

/// The backward step of the shifted Linear product: it keeps the input,
/// the weight and the shifts.
#[derive(Debug)]
struct ShiftedBackward;

/// The kept operands of [`ShiftedBackward`].
#[derive(Debug, Clone)]
struct ShiftedState {
    x: FlexTensor,
    weight: FlexTensor,
    shift: FlexTensor,
    factors: Vec<f32>,
    shape: ShiftedShape,
}

impl Backward<Flex, 2> for ShiftedBackward {
    type State = ShiftedState;

    fn backward(self, ops: Ops<ShiftedState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let st = ops.state;
        let s = st.shape;
        if let Some(p) = px {
            let (w, shift) = (values(&st.weight), values(&st.shift));
            let dx = shifted::input_grad(&s, w, shift, &st.factors, values(&dy));
            grads.register::<Flex>(p.id, flex(dx, vec![s.groups * s.rows, s.i]));
        }
        if let Some(p) = pw {
            let dw = outer::weight_grad(values(&st.x), values(&dy), s.groups * s.rows, s.i, s.o);
            grads.register::<Flex>(p.id, flex(dw, vec![s.i, s.o]));
        }
    }
}

/// `[r, i, o]` of a Linear product's `x` `[r, i]` and `weight` `[i, o]`.
fn linear_dims(x: &FlexTensor, weight: &FlexTensor) -> (usize, usize, usize) {
    let (xs, ws) = (x.shape(), weight.shape());
    assert!(
        xs.num_dims() == 2 && ws.num_dims() == 2 && xs[1] == ws[0],
        "x [R, i] and weight [i, o], not {:?} and {:?}",
        xs.to_vec(),
        ws.to_vec()
    );
    (xs[0], ws[0], ws[1])
}

/// The backward step of the grouped Linear product: the input gradient
/// `dy Wᵀ`; the groups' products, which it leaves in the sink (or their
/// sum and centered sum of squares) with the output gradient; and, when
/// asked, the weight gradient as their sum.
#[derive(Debug)]
struct GroupedLinearBackward;

/// The kept operands of [`GroupedLinearBackward`].
#[derive(Debug, Clone)]
struct GroupedLinearState {
    x: FlexTensor,
    weight: FlexTensor,
    rows: usize,
    /// Whether the weight's gradient is registered.
    weight_grad: bool,
    /// Where the output gradient goes (and, in a pass for micro-batch
    /// gradients, the groups' products); None for the plain product.
    sink: Option<ConvSink>,
}

impl Backward<Flex, 2> for GroupedLinearBackward {
    type State = GroupedLinearState;

    fn backward(
        self,
        ops: Ops<GroupedLinearState, 2>,
        grads: &mut Gradients,
        _: &mut Checkpointer,
    ) {
        let [px, pw] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let st = ops.state;
        let (r, i, o) = linear_dims(&st.x, &st.weight);
        if let Some(p) = px {
            let dx = outer::product_transposed(values(&dy), values(&st.weight), r, i, o);
            grads.register::<Flex>(p.id, flex(dx, vec![r, i]));
        }
        let (x, groups) = (values(&st.x), r / st.rows);
        let dy_sunk = || dy.clone().reshape(vec![r, o, 1, 1].into());
        let sink = match &st.sink {
            Some(sink) if sink.mode() != conv::PerExample::Squares => sink,
            plain_or_exact => {
                // The plain product, or an exact pass's: the weight's
                // gradient where it takes one, and the output gradient to
                // the sink, from which (with the input it recorded) the
                // layer's rule forms what its estimator asks for.
                if let (Some(p), true) = (&pw, st.weight_grad) {
                    let dw = outer::weight_grad(x, values(&dy), r, i, o);
                    grads.register::<Flex>(p.id, flex(dw, vec![i, o]));
                }
                if let Some(sink) = plain_or_exact {
                    sink.put(None, None, dy_sunk());
                }
                return;
            }
        };
        // The groups' products are formed whether or not the weight takes
        // a gradient: the sink asked for them.
        let dy_sunk = dy_sunk();
        let register = |grads: &mut Gradients, sum: Vec<f32>| {
            if let (Some(p), true) = (&pw, st.weight_grad) {
                grads.register::<Flex>(p.id, flex(sum, vec![i, o]));
            }
        };
        if sink.wants_summary() {
            let (sum, centered) = outer::group_outer_moments(x, values(&dy), st.rows, i, o);
            if st.weight_grad {
                register(grads, sum.clone());
            }
            let moments = GroupMomentSums {
                groups,
                sum,
                centered,
            };
            sink.put_moments(moments, dy_sunk);
        } else if st.weight_grad && pw.is_some() {
            let (each, sum) = outer::group_outer_summed(x, values(&dy), st.rows, i, o);
            register(grads, sum);
            let sums = GradGroups {
                groups,
                weight: each,
                bias: Vec::new(),
            };
            sink.put(None, Some(sums), dy_sunk);
        } else {
            let each = outer::group_outer(x, values(&dy), st.rows, i, o);
            let sums = GradGroups {
                groups,
                weight: each,
                bias: Vec::new(),
            };
            sink.put(None, Some(sums), dy_sunk);
        }
    }
}

/// The pooling's geometry from its input's shape.
fn pool_shape(
    x: &FlexTensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> PoolShape {
    let [b, c, height, width] = dims4(x);
    PoolShape {
        planes: b * c,
        height,
        width,
        kernel,
        stride,
        padding,
    }
}

/// The pooled output of a contiguous `x` and the positions it took.
fn flex_max_pool2d(x: &FlexTensor, s: &PoolShape) -> (FlexTensor, Vec<u32>) {
    let [b, c, _, _] = dims4(x);
    let [ho, wo] = s.output_size().expect("max_pool2d checks the shape");
    let (y, arg) = pool::forward(s, values(x));
    (flex(y, vec![b, c, ho, wo]), arg)
}

/// The backward step of max pooling: it keeps only the position each
/// output took.
#[derive(Debug)]
struct PoolBackward;

/// The kept values of [`PoolBackward`].
#[derive(Debug, Clone)]
struct PoolState {
    arg: Vec<u32>,
    shape: PoolShape,
}

impl Backward<Flex, 1> for PoolBackward {
    type State = PoolState;

    fn backward(self, ops: Ops<PoolState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let dy = contiguous(grads.consume::<Flex>(&ops.node));
        let st = ops.state;
        if let Some(p) = px {
            let dx = pool::backward(&st.shape, values(&dy), &st.arg);
            let [b, c] = [dy.shape()[0], dy.shape()[1]];
            grads.register::<Flex>(p.id, flex(dx, vec![b, c, st.shape.height, st.shape.width]));
        }
    }
}

/// The values of `t` to overwrite, where `t` holds its buffer alone and
/// starts it (then an elementwise op can run in place, as burn's own do).
fn values_in_place(t: &mut FlexTensor) -> Option<&mut [f32]> {
    let n = t.layout().num_elements();
    let alone = t.is_unique() && t.layout().is_contiguous() && t.layout().start_offset() == 0;
    alone.then(|| &mut t.storage_mut::<f32>()[..n])
}

/// ReLU of `x`, in its buffer where it holds it alone.
fn flex_relu(x: FlexTensor) -> FlexTensor {
    let mut x = contiguous(x);
    if let Some(v) = values_in_place(&mut x) {
        relu::forward_in_place(v);
        return x;
    }
    flex(relu::forward(values(&x)), x.shape().to_vec())
}

/// `max(a + b, 0)`, in `a`'s buffer where it holds it alone.
fn flex_add_relu(a: FlexTensor, b: FlexTensor) -> FlexTensor {
    let (mut a, b) = (contiguous(a), contiguous(b));
    assert_eq!(a.shape(), b.shape(), "add_relu: two operands of one shape");
    if let Some(v) = values_in_place(&mut a) {
        relu::add_forward_in_place(v, values(&b));
        return a;
    }
    flex(
        relu::add_forward(values(&a), values(&b)),
        a.shape().to_vec(),
    )
}

/// The ReLU's gradient from its output `y` and the output gradient `dy`,
/// in `dy`'s buffer where it holds it alone.
fn relu_grad(y: &FlexTensor, dy: FlexTensor) -> FlexTensor {
    let mut dy = contiguous(dy);
    match values_in_place(&mut dy) {
        Some(v) => {
            relu::backward_in_place(values(y), v);
            dy
        }
        None => flex(relu::backward(values(y), values(&dy)), dy.shape().to_vec()),
    }
}

/// The backward step of `max(a + b, 0)`: the ReLU's gradient, handed to
/// both operands. It keeps the output.
#[derive(Debug)]
struct AddReluBackward;

impl Backward<Flex, 2> for AddReluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pa, pb] = ops.parents;
        let dx = relu_grad(&ops.state, grads.consume::<Flex>(&ops.node));
        match (pa, pb) {
            (Some(a), Some(b)) => {
                grads.register::<Flex>(a.id, dx.clone());
                grads.register::<Flex>(b.id, dx);
            }
            (Some(p), None) | (None, Some(p)) => grads.register::<Flex>(p.id, dx),
            (None, None) => {}
        }
    }
}

/// The backward step of ReLU: it keeps the output, whose sign says where
/// the gradient passes.
#[derive(Debug)]
struct ReluBackward;

impl Backward<Flex, 1> for ReluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(p) = px {
            grads.register::<Flex>(p.id, relu_grad(&ops.state, dy));
        }
    }
}

type AutodiffFlex<C> = Autodiff<Flex, C>;

/// The convolution on `Autodiff<Flex>`: the flex kernel forward, and a
/// [`ConvBackward`] step when any operand is tracked.
fn autodiff_conv2d<C: CheckpointStrategy>(
    x: FloatTensor<AutodiffFlex<C>>,
    weight: FloatTensor<AutodiffFlex<C>>,
    bias: Option<FloatTensor<AutodiffFlex<C>>>,
    stride: [usize; 2],
    padding: [(usize, usize); 2],
    example_groups: usize,
    sink: Option<ConvSink>,
) -> FloatTensor<AutodiffFlex<C>> {
    let s = conv_shape(
        x.primitive(),
        weight.primitive(),
        stride,
        padding,
        example_groups,
    );
    let has_bias = bias.is_some();
    let state = |x: &FlexTensor, w: &FlexTensor| ConvState {
        x: contiguous(x.clone()),
        weight: contiguous(w.clone()),
        shape: s,
        example_groups,
        has_bias,
        sink: sink.clone(),
    };
    match bias {
        Some(bias) => {
            let nodes = [x.node(), weight.node(), bias.node()];
            match <ConvBackward as Backward<Flex, 3>>::prepare::<C>(ConvBackward, nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let st = state(x.primitive(), weight.primitive());
                    let out = flex_conv2d(
                        st.x.clone(),
                        st.weight.clone(),
                        Some(bias.into_primitive()),
                        &s,
                    );
                    prep.finish(st, out)
                }
                OpsKind::UnTracked(prep) => prep.finish(flex_conv2d(
                    x.into_primitive(),
                    weight.into_primitive(),
                    Some(bias.into_primitive()),
                    &s,
                )),
            }
        }
        None => {
            let nodes = [x.node(), weight.node()];
            match <ConvBackward as Backward<Flex, 2>>::prepare::<C>(ConvBackward, nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let st = state(x.primitive(), weight.primitive());
                    let out = flex_conv2d(st.x.clone(), st.weight.clone(), None, &s);
                    prep.finish(st, out)
                }
                OpsKind::UnTracked(prep) => prep.finish(flex_conv2d(
                    x.into_primitive(),
                    weight.into_primitive(),
                    None,
                    &s,
                )),
            }
        }
    }
}

impl<C: CheckpointStrategy> FastKernels for AutodiffFlex<C> {
    fn fast_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [(usize, usize); 2],
        example_groups: usize,
        sink: Option<ConvSink>,
    ) -> FloatTensor<Self> {
        autodiff_conv2d::<C>(x, weight, None, stride, padding, example_groups, sink)
    }

    fn fast_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [(usize, usize); 2],
        example_groups: usize,
        sink: Option<ConvSink>,
    ) -> FloatTensor<Self> {
        autodiff_conv2d::<C>(x, weight, Some(bias), stride, padding, example_groups, sink)
    }

    fn fast_sunk_output_grad(_like: FloatTensor<Self>, sink: ConvSink) -> FloatTensor<Self> {
        Self::from_inner(sink.flex_output_grad())
    }

    fn fast_max_pool2d(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        let s = pool_shape(x.primitive(), kernel, stride, padding);
        let xp = contiguous(x.primitive().clone());
        let (y, arg) = flex_max_pool2d(&xp, &s);
        match PoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(PoolState { arg, shape: s }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fast_relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // The input is given up (as burn's ReLU gives it up), so that the
        // output can take its buffer when nothing else holds it.
        let (xp, node) = x.into_parts();
        let prep = ReluBackward.prepare::<C>([node]).compute_bound().stateful();
        let y = flex_relu(xp);
        match prep {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fast_add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        // `a` is given up (as burn's add gives up its left operand), so
        // that the output can take its buffer when nothing else holds it.
        let (ap, a_node) = a.into_parts();
        let prep = AddReluBackward
            .prepare::<C>([a_node, b.node()])
            .compute_bound()
            .stateful();
        let y = flex_add_relu(ap, b.primitive().clone());
        match prep {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fast_linear_shifted(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        factors: Vec<f32>,
    ) -> FloatTensor<Self> {
        let s = shifted_shape(x.primitive(), weight.primitive(), shift.primitive());
        let st = ShiftedState {
            x: contiguous(x.primitive().clone()),
            weight: contiguous(weight.primitive().clone()),
            shift: contiguous(shift.primitive().clone()),
            factors,
            shape: s,
        };
        let y = shifted::forward(
            &s,
            values(&st.x),
            values(&st.weight),
            values(&st.shift),
            &st.factors,
        );
        let y = flex(y, vec![s.groups * s.rows, s.o]);
        match ShiftedBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(st, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fast_linear_grouped(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rows: usize,
        weight_grad: bool,
        sink: ConvSink,
    ) -> FloatTensor<Self> {
        grouped_linear::<C>(x, weight, rows, weight_grad, Some(sink))
    }

    fn fast_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let rows = x.primitive().shape()[0].max(1);
        grouped_linear::<C>(x, weight, rows, true, None)
    }

    fn fast_row_mean(t: FloatTensor<Self>) -> FloatTensor<Self> {
        // Not differentiable: the mean of the inner tensor.
        Self::from_inner(<Flex as FastKernels>::fast_row_mean(t.primitive().clone()))
    }

    fn fast_row_squares(t: FloatTensor<Self>) -> FloatTensor<Self> {
        // Not differentiable: the sums of the inner tensor.
        Self::from_inner(<Flex as FastKernels>::fast_row_squares(
            t.primitive().clone(),
        ))
    }

    fn fast_row_mean_and_squares(t: FloatTensor<Self>) -> FloatTensor<Self> {
        // Not differentiable: the sums of the inner tensor.
        Self::from_inner(<Flex as FastKernels>::fast_row_mean_and_squares(
            t.primitive().clone(),
        ))
    }

    fn fast_weighted_row_sum(t: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        // Not differentiable: the sum of the inner tensors.
        let (t, w) = (t.primitive().clone(), w.primitive().clone());
        Self::from_inner(<Flex as FastKernels>::fast_weighted_row_sum(t, w))
    }

    fn fast_centered_squares(t: FloatTensor<Self>, m: FloatTensor<Self>) -> FloatTensor<Self> {
        // Not differentiable: the sums of the inner tensors.
        let (t, m) = (t.primitive().clone(), m.primitive().clone());
        Self::from_inner(<Flex as FastKernels>::fast_centered_squares(t, m))
    }

    fn fast_squared_outer(a: FloatTensor<Self>, d: FloatTensor<Self>) -> FloatTensor<Self> {
        // Not differentiable: the product of the inner tensors' squares.
        let (a, d) = (a.primitive().clone(), d.primitive().clone());
        Self::from_inner(<Flex as FastKernels>::fast_squared_outer(a, d))
    }

    fn fast_column_squares(t: FloatTensor<Self>) -> FloatTensor<Self> {
        // Not differentiable: the sums of the inner tensor.
        Self::from_inner(<Flex as FastKernels>::fast_column_squares(
            t.primitive().clone(),
        ))
    }

    fn fast_group_outer(
        a: FloatTensor<Self>,
        d: FloatTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        // Not differentiable: the products of the inner tensors.
        let (a, d) = (a.primitive().clone(), d.primitive().clone());
        Self::from_inner(<Flex as FastKernels>::fast_group_outer(a, d, rows))
    }

    fn fast_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        sink: Option<NormSink>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let s = norm_shape(x.primitive(), groups);
        let xp = contiguous(x.primitive().clone());
        let gp = contiguous(gamma.primitive().clone());
        let bp = contiguous(beta.primitive().clone());
        let [y, mean, var, inv_std, mean_lo] = flex_batch_norm(&xp, &gp, &bp, &s, eps);
        let nodes = [x.node(), gamma.node(), beta.node()];
        let y = match NormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(
                NormState {
                    x: xp,
                    gamma: gp,
                    mean: mean.clone(),
                    mean_lo,
                    inv_std,
                    shape: s,
                    sink,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        // The statistics leave the graph: the running estimates are not
        // differentiated (as in PyTorch).
        (y, Self::from_inner(mean), Self::from_inner(var))
    }
}

/// `x w` on `Autodiff<Flex>` with [`GroupedLinearBackward`]: groups of
/// `rows` rows, the weight's gradient registered with `weight_grad`, and
/// the output gradient (and what the sink asks for) left in `sink`.
fn grouped_linear<C: CheckpointStrategy>(
    x: FloatTensor<AutodiffFlex<C>>,
    weight: FloatTensor<AutodiffFlex<C>>,
    rows: usize,
    weight_grad: bool,
    sink: Option<ConvSink>,
) -> FloatTensor<AutodiffFlex<C>> {
    let xp = contiguous(x.primitive().clone());
    let wp = contiguous(weight.primitive().clone());
    let (r, i, o) = linear_dims(&xp, &wp);
    assert!(
        rows > 0 && r.is_multiple_of(rows),
        "{r} rows do not make groups of {rows}"
    );
    let y = flex(
        outer::product(values(&xp), values(&wp), r, i, o),
        vec![r, o],
    );
    match GroupedLinearBackward
        .prepare::<C>([x.node(), weight.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            GroupedLinearState {
                x: xp,
                weight: wp,
                rows,
                weight_grad,
                sink,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}
