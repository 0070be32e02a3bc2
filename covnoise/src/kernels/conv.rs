//! 2-d convolution on host `f32` slices in NCHW layout (groups 1, dilation
//! 1): the forward pass and both gradients, each parallel over examples.
//!
//! Every product goes through the `gemm` crate (the one burn's flex backend
//! uses) on one example at a time, so an example's unfolded input ("col",
//! `[C_in kh kw, H' W']`) is the only temporary and is rebuilt where it is
//! needed instead of being kept from the forward pass:
//! - forward: `Y_n = W col_n (+ b)`, written straight into the output;
//! - weight gradient: `dWᵀ = Σ_n col_n dY_nᵀ`, one accumulator per task;
//! - input gradient: with stride 1 a convolution of `dY` with the flipped
//!   weight; otherwise `dcol_n = Wᵀ dY_n`, scattered back row by row
//!   (col2im).
//!
//! Stride-1 convolutions with at least 8 input channels unfold only along
//! the kernel's width (`[C_in kw, H_pad W']`, see [`unfold_tap_rows`]) and
//! run one product per kernel row on shifts of that buffer; their weight
//! gradient, where a CPU with AVX-512 meets at most 32 output channels,
//! reads the same unfolding laid out position-major ([`TapLayout`]).

use gemm::Parallelism;
use rayon::prelude::*;

use super::{output_buffer, output_items, with_scratch};

/// The geometry of one convolution: input `[batch, c_in, height, width]`,
/// weight `[c_out, c_in, kh, kw]`, output `[batch, c_out, H', W']`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Examples.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel size `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride `[sh, sw]`.
    pub stride: [usize; 2],
    /// Zero padding `[(top, bottom), (left, right)]`.
    pub padding: [(usize, usize); 2],
}

impl ConvShape {
    /// Output size `[H', W']`; None when the padded input is smaller than
    /// the kernel or a stride or kernel size is 0.
    pub fn output_size(&self) -> Option<[usize; 2]> {
        let [(pt, pb), (pl, pr)] = self.padding;
        let size =
            |n: usize, k: usize, s: usize| (k > 0 && s > 0 && n >= k).then(|| (n - k) / s + 1);
        Some([
            size(self.height + pt + pb, self.kernel[0], self.stride[0])?,
            size(self.width + pl + pr, self.kernel[1], self.stride[1])?,
        ])
    }

    /// Rows of the unfolded input, `c_in kh kw` (the weight's row length).
    pub fn rows(&self) -> usize {
        self.c_in * self.kernel[0] * self.kernel[1]
    }

    /// Output positions per channel, `H' W'`.
    pub fn positions(&self) -> usize {
        let [ho, wo] = self.output_size().expect("a valid convolution shape");
        ho * wo
    }

    /// Input values per example.
    pub fn input_len(&self) -> usize {
        self.c_in * self.height * self.width
    }

    /// Output values per example.
    pub fn output_len(&self) -> usize {
        self.c_out * self.positions()
    }

    /// Whether the convolution runs as one product per kernel row on the
    /// input unfolded along the kernel's width (see [`forward_tap_rows`]):
    /// stride 1, a kernel larger than 1x1, and enough input channels (each
    /// product has `C_in kw` terms) for gemm to run near its peak.
    fn uses_taps(&self) -> bool {
        self.stride == [1, 1] && self.kernel != [1, 1] && self.c_in >= TAPS_MIN_CHANNELS
    }

    /// A 1x1 kernel with stride 1 and no padding: the input already is its
    /// own unfolding.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [(0, 0), (0, 0)]
    }

    /// The output columns `ow` whose input column `ow sw + j - left` lies
    /// inside the image, as a range.
    fn valid_columns(&self, j: usize, wo: usize) -> (usize, usize) {
        let (sw, pl, w) = (self.stride[1], self.padding[1].0, self.width);
        let lo = if j >= pl { 0 } else { (pl - j).div_ceil(sw) };
        let hi = if w + pl > j {
            ((w + pl - j - 1) / sw + 1).min(wo)
        } else {
            0
        };
        (lo.min(wo), hi.max(lo.min(wo)))
    }
}

/// A convolution's weights and biases, one per consecutive group of
/// examples: `weight` holds G weights `[c_out, c_in, kh, kw]` one after the
/// other (`[G c_out, c_in, kh, kw]`) and `bias` G biases, and examples `j
/// B/G .. (j + 1) B/G` meet the j-th. G = 1 is the ordinary convolution;
/// more groups let one pass run each micro-batch of a batch at parameters
/// of its own (a regularizer's finite differences).
#[derive(Clone, Copy)]
struct GroupedWeights<'a> {
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    /// Examples per group.
    per_group: usize,
    /// Values of one weight, `c_out c_in kh kw`.
    len: usize,
    c_out: usize,
}

impl<'a> GroupedWeights<'a> {
    /// The groups of `weight` and `bias` for a batch of shape `s`; panics
    /// where they do not come in whole weights that divide the batch.
    fn new(s: &ConvShape, weight: &'a [f32], bias: Option<&'a [f32]>) -> Self {
        let len = s.c_out * s.rows();
        assert!(
            len > 0 && weight.len().is_multiple_of(len),
            "the weight holds whole [c_out, c_in, kh, kw] weights"
        );
        let groups = weight.len() / len;
        assert!(
            groups >= 1 && s.batch.is_multiple_of(groups),
            "{groups} weight groups cannot split a batch of {}",
            s.batch
        );
        if let Some(b) = bias {
            assert_eq!(b.len(), groups * s.c_out, "one bias per weight");
        }
        Self {
            weight,
            bias,
            per_group: (s.batch / groups).max(1),
            len,
            c_out: s.c_out,
        }
    }

    /// The weight and bias that example `n` meets.
    fn of(&self, n: usize) -> (&'a [f32], Option<&'a [f32]>) {
        let g = n / self.per_group;
        (
            &self.weight[g * self.len..][..self.len],
            self.bias.map(|b| &b[g * self.c_out..][..self.c_out]),
        )
    }
}

/// Fewest input channels for [`forward_tap_rows`]; below it (the first
/// layers of LeNet-5 and ResNet, 1 and 3 channels) im2col's single product
/// with `C_in kh kw` terms is faster than kh products of `C_in kw` terms.
const TAPS_MIN_CHANNELS: usize = 8;

/// How examples are spread over threads: one task per `per_task` examples,
/// at least one example per thread; with fewer examples than threads the
/// products themselves run in parallel instead.
fn plan(batch: usize, tasks_per_thread: usize) -> (usize, Parallelism) {
    let threads = rayon::current_num_threads().max(1);
    if batch >= threads {
        let tasks = (threads * tasks_per_thread).min(batch);
        (batch.div_ceil(tasks), Parallelism::None)
    } else {
        (batch.max(1), Parallelism::Rayon(0))
    }
}

/// Whether [`plan`]'s parallelism runs the examples in parallel (rather
/// than each product).
fn by_example(par: Parallelism) -> bool {
    matches!(par, Parallelism::None)
}

/// [`plan`] for a weight gradient: with [`PerExample::Groups`], tasks of
/// whole groups where there are at least as many groups as threads, so
/// that each group's sum runs in example order on one thread and does not
/// depend on how many other groups the batch holds (one process's shard of
/// a global batch, or all of it, give the same group sums bit for bit).
fn weight_grad_plan(batch: usize, per_example: PerExample) -> (usize, Parallelism) {
    let (per_task, par) = plan(batch, 1);
    match per_example {
        PerExample::Groups(b) if batch / b >= rayon::current_num_threads().max(1) => {
            (per_task.div_ceil(b) * b, par)
        }
        _ => (per_task, par),
    }
}

/// `dst (m x n, row stride dst_rs) (+)= lhs (m x k) rhs (k x n)` with
/// arbitrary element strides `[row, column]` for the operands.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    [m, n, k]: [usize; 3],
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    [lhs_rs, lhs_cs]: [usize; 2],
    rhs: &[f32],
    [rhs_rs, rhs_cs]: [usize; 2],
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The bounds gemm will touch, checked once so that the unsafe call
    // below stays inside the slices.
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    // SAFETY: the asserts above keep every index gemm computes from these
    // strides inside the three slices, and dst does not alias lhs or rhs
    // (a `&mut` and two `&` borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `dst = src` for the short runs of im2col (one output row, often 8 to
/// 32 values): fixed-size blocks the compiler inlines, where
/// `copy_from_slice` would call `memcpy` once per run (a third of im2col's
/// time on ResNet-20 went to those calls).
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    assert_eq!(n, src.len());
    if n >= 8 {
        for (d, s) in dst.chunks_exact_mut(8).zip(src.chunks_exact(8)) {
            let d: &mut [f32; 8] = d.try_into().expect("a chunk of 8");
            *d = *<&[f32; 8]>::try_from(s).expect("a chunk of 8");
        }
        // The tail as one overlapping block of 8 (rewriting equal values).
        let d: &mut [f32; 8] = (&mut dst[n - 8..]).try_into().expect("8 values");
        *d = *<&[f32; 8]>::try_from(&src[n - 8..]).expect("8 values");
    } else {
        for i in 0..n {
            dst[i] = std::hint::black_box(src[i]);
        }
    }
}

/// `dst = 0` for the short runs of im2col (see [`copy_run`]).
#[inline(always)]
fn zero_run(dst: &mut [f32]) {
    let n = dst.len();
    if n >= 8 {
        for d in dst.chunks_exact_mut(8) {
            *<&mut [f32; 8]>::try_from(d).expect("a chunk of 8") = [0.0; 8];
        }
        *<&mut [f32; 8]>::try_from(&mut dst[n - 8..]).expect("8 values") = [0.0; 8];
    } else {
        for d in dst.iter_mut() {
            *d = std::hint::black_box(0.0);
        }
    }
}

/// Unfolds one example `x` `[c_in, H, W]` into `col` `[c_in kh kw, H' W']`
/// (row `(c kh + i) kw + j` holds the inputs that kernel tap `(i, j)` of
/// channel `c` meets), writing every element of `col`.
fn im2col(s: &ConvShape, x: &[f32], col: &mut [f32]) {
    let [ho, wo] = s.output_size().expect("a valid convolution shape");
    let [kh, kw] = s.kernel;
    let [sh, sw] = s.stride;
    let (pt, pl) = (s.padding[0].0, s.padding[1].0);
    let (h, w) = (s.height, s.width);
    let p = ho * wo;
    for (row, out) in col.chunks_exact_mut(p).enumerate() {
        let (c, i, j) = (row / (kh * kw), (row / kw) % kh, row % kw);
        let (lo, hi) = s.valid_columns(j, wo);
        let plane = &x[c * h * w..][..h * w];
        for (oh, dst) in out.chunks_exact_mut(wo).enumerate() {
            let ih = oh * sh + i;
            if ih < pt || ih - pt >= h {
                zero_run(dst);
                continue;
            }
            let src = &plane[(ih - pt) * w..][..w];
            zero_run(&mut dst[..lo]);
            zero_run(&mut dst[hi..]);
            if lo < hi {
                let start = lo * sw + j - pl;
                if sw == 1 {
                    copy_run(&mut dst[lo..hi], &src[start..start + hi - lo]);
                } else {
                    for (d, v) in dst[lo..hi].iter_mut().zip(src[start..].iter().step_by(sw)) {
                        *d = *v;
                    }
                }
            }
        }
    }
}

/// Adds the unfolded gradient `dcol` `[c_in kh kw, H' W']` back onto the
/// input positions each row came from, into `dx` `[c_in, H, W]`.
fn col2im_add(s: &ConvShape, dcol: &[f32], dx: &mut [f32]) {
    let [ho, wo] = s.output_size().expect("a valid convolution shape");
    let [kh, kw] = s.kernel;
    let [sh, sw] = s.stride;
    let (pt, pl) = (s.padding[0].0, s.padding[1].0);
    let (h, w) = (s.height, s.width);
    let p = ho * wo;
    for (row, grad) in dcol.chunks_exact(p).enumerate() {
        let (c, i, j) = (row / (kh * kw), (row / kw) % kh, row % kw);
        let (lo, hi) = s.valid_columns(j, wo);
        if lo >= hi {
            continue;
        }
        let plane = &mut dx[c * h * w..][..h * w];
        for (oh, src) in grad.chunks_exact(wo).enumerate() {
            let ih = oh * sh + i;
            if ih < pt || ih - pt >= h {
                continue;
            }
            let dst = &mut plane[(ih - pt) * w..][..w];
            let start = lo * sw + j - pl;
            if sw == 1 {
                for (d, v) in dst[start..start + hi - lo].iter_mut().zip(&src[lo..hi]) {
                    *d += *v;
                }
            } else {
                for (d, v) in dst[start..].iter_mut().step_by(sw).zip(&src[lo..hi]) {
                    *d += *v;
                }
            }
        }
    }
}

/// The convolution `x` `[B, c_in, H, W]` * `weight` `[c_out, c_in, kh, kw]`
/// plus `bias` `[c_out]`, as a new `[B, c_out, H', W']` buffer. `weight`
/// and `bias` may hold G weights and biases for G consecutive groups of
/// examples (`[G c_out, ...]`, see [`GroupedWeights`]).
pub fn forward(s: &ConvShape, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (k, p, per_in, per_out) = (s.rows(), s.positions(), s.input_len(), s.output_len());
    assert_eq!(x.len(), s.batch * per_in);
    let groups = GroupedWeights::new(s, weight, bias);
    if s.uses_taps() {
        return forward_tap_rows(s, x, groups);
    }
    let (per_task, par) = plan(s.batch, 4);
    let example = |n: usize, out_n: &mut [f32]| {
        let scratch = if s.is_pointwise() { 0 } else { k * p };
        with_scratch(scratch, |col| {
            let x_n = &x[n * per_in..][..per_in];
            let (weight, bias) = groups.of(n);
            let col: &[f32] = if s.is_pointwise() {
                x_n
            } else {
                im2col(s, x_n, col);
                col
            };
            // The bias goes in first and gemm adds the product to it.
            if let Some(b) = bias {
                for (row, &v) in out_n.chunks_exact_mut(p).zip(b) {
                    row.fill(v);
                }
            }
            let (w_st, col_st) = ([k, 1], [p, 1]);
            let mnk = [s.c_out, p, k];
            matmul(
                mnk,
                out_n,
                p,
                bias.is_some(),
                weight,
                w_st,
                col,
                col_st,
                par,
            );
        });
    };
    output_items(
        s.batch * per_out,
        per_out,
        per_task,
        by_example(par),
        example,
    )
}

/// What a weight-gradient product forms of the per-example gradients on
/// the way to the batch's (a fast convolution's weight-gradient step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PerExample {
    /// Nothing: only the batch gradient.
    #[default]
    Nothing,
    /// The sums over the examples of their squares ([`GradSquares`]).
    Squares,
    /// The sums over consecutive groups of this many examples (micro-batch
    /// gradients, [`GradGroups`]); the batch must be a whole number of
    /// groups.
    Groups(usize),
}

/// The weight and bias gradients of a convolution ([`weight_grad`]), and
/// what was asked of the per-example gradients.
#[derive(Debug, Clone)]
pub struct WeightGrads {
    /// The weight gradient `[c_out, c_in, kh, kw]`.
    pub weight: Vec<f32>,
    /// The bias gradient `[c_out]` (empty without bias).
    pub bias: Vec<f32>,
    /// `Σ_n G_n²` and `Σ_n b_n²` of the per-example gradients, in the same
    /// layouts, when they were asked for.
    pub squares: Option<GradSquares>,
    /// The gradients of consecutive groups of examples, when they were
    /// asked for.
    pub groups: Option<GradGroups>,
}

/// Sums over the examples of the squared per-example weight and bias
/// gradients of one convolution.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GradSquares {
    /// `Σ_n G_n²`, `[c_out, c_in, kh, kw]`.
    pub weight: Vec<f32>,
    /// `Σ_n b_n²`, `[c_out]` (empty without bias).
    pub bias: Vec<f32>,
}

/// Sums of the per-example weight and bias gradients of one convolution
/// over consecutive groups of examples: group g holds examples `g b ..
/// (g + 1) b`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GradGroups {
    /// Number of groups G.
    pub groups: usize,
    /// `[G, c_out, c_in, kh, kw]`.
    pub weight: Vec<f32>,
    /// `[G, c_out]` (empty without bias).
    pub bias: Vec<f32>,
}

/// One task's running sums over its examples `first..end`: the gradient
/// (in a kernel path's own layout) and the bias gradient; with
/// [`PerExample::Squares`], their squared per-example counterparts and one
/// example's gradient; with [`PerExample::Groups`], one gradient and bias
/// gradient per group the task's examples touch (the batch gradient is
/// then their sum, formed when the tasks are reduced).
struct TaskSums {
    mode: PerExample,
    len: usize,
    acc: Vec<f32>,
    acc_bias: Vec<f64>,
    sq: Vec<f64>,
    sq_bias: Vec<f64>,
    example: Vec<f32>,
    first_group: usize,
    grp: Vec<f32>,
    grp_bias: Vec<f64>,
}

impl TaskSums {
    fn new(
        len: usize,
        c_out: usize,
        with_bias: bool,
        mode: PerExample,
        examples: std::ops::Range<usize>,
    ) -> Self {
        let c_bias = if with_bias { c_out } else { 0 };
        let squares = mode == PerExample::Squares;
        let if_sq = |n: usize| if squares { n } else { 0 };
        let (first_group, touched) = match mode {
            PerExample::Groups(b) if !examples.is_empty() => {
                let first = examples.start / b;
                (first, (examples.end - 1) / b + 1 - first)
            }
            _ => (0, 0),
        };
        let grouped = matches!(mode, PerExample::Groups(_));
        Self {
            mode,
            len,
            acc: vec![0.0; if grouped { 0 } else { len }],
            acc_bias: vec![0.0; c_bias],
            sq: vec![0.0; if_sq(len)],
            sq_bias: vec![0.0; if_sq(c_bias)],
            example: vec![0.0; if_sq(len)],
            first_group,
            grp: vec![0.0; touched * len],
            grp_bias: vec![0.0; touched * c_bias],
        }
    }

    /// Where example `n`'s gradient goes, and whether the product adds to
    /// what is there (the batch's or its group's running sum) or overwrites
    /// it (the one-example buffer of [`PerExample::Squares`]).
    fn target(&mut self, n: usize) -> (&mut [f32], bool) {
        match self.mode {
            PerExample::Nothing => (&mut self.acc, true),
            PerExample::Squares => (&mut self.example, false),
            PerExample::Groups(b) => {
                let g = n / b - self.first_group;
                (&mut self.grp[g * self.len..][..self.len], true)
            }
        }
    }

    /// Ends example `n`: its output gradient `dy_n` `[c_out, positions]`
    /// gives its bias gradient, and with [`PerExample::Squares`] its
    /// gradient, just written to the one-example buffer, joins the sums.
    fn finish_example(&mut self, n: usize, dy_n: &[f32], positions: usize) {
        if self.mode == PerExample::Squares {
            for ((a, q), &v) in self.acc.iter_mut().zip(&mut self.sq).zip(&self.example) {
                *a += v;
                *q += (v as f64) * (v as f64);
            }
        }
        let c_bias = self.acc_bias.len();
        for (c, row) in dy_n.chunks_exact(positions).enumerate().take(c_bias) {
            let b = row.iter().map(|&v| v as f64).sum::<f64>();
            self.acc_bias[c] += b;
            match self.mode {
                PerExample::Nothing => {}
                PerExample::Squares => self.sq_bias[c] += b * b,
                PerExample::Groups(size) => {
                    self.grp_bias[(n / size - self.first_group) * c_bias + c] += b;
                }
            }
        }
    }
}

/// Runs `task` on the examples of each task (`per_task` examples each), in
/// parallel when the examples are spread over threads.
fn run_tasks(
    batch: usize,
    per_task: usize,
    par: Parallelism,
    task: impl Fn(std::ops::Range<usize>) -> TaskSums + Sync + Send,
) -> Vec<TaskSums> {
    let ranges: Vec<_> = (0..batch)
        .step_by(per_task)
        .map(|first| first..(first + per_task).min(batch))
        .collect();
    if matches!(par, Parallelism::None) {
        ranges.into_par_iter().map(task).collect()
    } else {
        ranges.into_iter().map(task).collect()
    }
}

/// The tasks' sums as [`WeightGrads`]: `at(i)` is the position in a task's
/// layout of element `i` of the `[c_out, c_in, kh, kw]` weight.
fn reduce_tasks(parts: &[TaskSums], numel: usize, at: impl Fn(usize) -> usize) -> WeightGrads {
    let c_out = parts.first().map_or(0, |p| p.acc_bias.len());
    let mode = parts.first().map_or(PerExample::Nothing, |p| p.mode);
    let bias_sum =
        |f: fn(&TaskSums) -> &Vec<f64>, c: usize| parts.iter().map(|p| f(p)[c]).sum::<f64>() as f32;
    let bias = (0..c_out).map(|c| bias_sum(|p| &p.acc_bias, c)).collect();
    let squares = (mode == PerExample::Squares).then(|| GradSquares {
        weight: (0..numel)
            .map(|i| parts.iter().map(|p| p.sq[at(i)]).sum::<f64>() as f32)
            .collect(),
        bias: (0..c_out).map(|c| bias_sum(|p| &p.sq_bias, c)).collect(),
    });
    let mut weight = output_buffer(numel);
    let groups = if let PerExample::Groups(_) = mode {
        // A group split between two tasks is the sum of their parts.
        let count = parts
            .iter()
            .map(|p| p.first_group + p.grp.len() / p.len.max(1))
            .max()
            .unwrap_or(0);
        let mut g = GradGroups {
            groups: count,
            weight: vec![0.0; count * numel],
            bias: vec![0.0; count * c_out],
        };
        for p in parts {
            let touched = p.grp.len() / p.len.max(1);
            for t in 0..touched {
                let dst = &mut g.weight[(p.first_group + t) * numel..][..numel];
                let src = &p.grp[t * p.len..][..p.len];
                for (i, d) in dst.iter_mut().enumerate() {
                    *d += src[at(i)];
                }
                let dst = &mut g.bias[(p.first_group + t) * c_out..][..c_out];
                for (d, &v) in dst.iter_mut().zip(&p.grp_bias[t * c_out..][..c_out]) {
                    *d += v as f32;
                }
            }
        }
        for (i, d) in weight.iter_mut().enumerate() {
            *d = (0..count)
                .map(|k| g.weight[k * numel + i] as f64)
                .sum::<f64>() as f32;
        }
        Some(g)
    } else {
        for (i, d) in weight.iter_mut().enumerate() {
            *d = parts.iter().map(|p| p.acc[at(i)]).sum();
        }
        None
    };
    WeightGrads {
        weight,
        bias,
        squares,
        groups,
    }
}

/// The weight gradient `[c_out, c_in, kh, kw]` and, when `with_bias`, the
/// bias gradient `[c_out]` of the convolution, from its input `x` and the
/// output gradient `dy` `[B, c_out, H', W']`, and what `per_example` asks
/// of the per-example gradients, from the same products: each example's
/// gradient is formed on its own (as the batch gradient's summands already
/// are). With [`PerExample::Squares`] it is added to the batch gradient and
/// its square to the sums, so the squares cost one pass over a
/// weight-sized buffer per example; with [`PerExample::Groups`] it is added
/// to its group's sum instead of the batch's, which costs nothing beyond
/// one weight-sized sum per group. No per-example tensor is kept.
pub fn weight_grad(
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    with_bias: bool,
    per_example: PerExample,
) -> WeightGrads {
    let (k, p, per_in, per_out) = (s.rows(), s.positions(), s.input_len(), s.output_len());
    assert_eq!(x.len(), s.batch * per_in);
    assert_eq!(dy.len(), s.batch * per_out);
    if let PerExample::Groups(b) = per_example {
        assert!(b > 0 && s.batch.is_multiple_of(b), "whole groups");
    }
    if s.uses_taps() {
        let layout = TapLayout::for_weight_grad(s);
        return weight_grad_tap_rows(s, x, dy, with_bias, per_example, layout);
    }
    // One accumulator per task, so few tasks: one per thread.
    let (per_task, par) = weight_grad_plan(s.batch, per_example);
    let task = |examples: std::ops::Range<usize>| {
        let mut sums = TaskSums::new(
            s.c_out * k,
            s.c_out,
            with_bias,
            per_example,
            examples.clone(),
        );
        let scratch = if s.is_pointwise() { 0 } else { k * p };
        with_scratch(scratch, |col| {
            for n in examples {
                let x_n = &x[n * per_in..][..per_in];
                let dy_n = &dy[n * per_out..][..per_out];
                let col: &[f32] = if s.is_pointwise() {
                    x_n
                } else {
                    im2col(s, x_n, col);
                    col
                };
                // dWᵀ += col dY_nᵀ, kept transposed ([K, C_out]): with col
                // as the row-major left operand gemm runs several times
                // faster than dY_n colᵀ, whose right operand it would read
                // across rows.
                let (col_st, dyt_st) = ([p, 1], [1, p]);
                let mnk = [k, s.c_out, p];
                let (dst, add) = sums.target(n);
                matmul(mnk, dst, s.c_out, add, col, col_st, dy_n, dyt_st, par);
                sums.finish_example(n, dy_n, p);
            }
        });
        sums
    };
    let parts = run_tasks(s.batch, per_task, par, task);
    reduce_tasks(&parts, s.c_out * k, |i| (i % k) * s.c_out + i / k)
}

/// With stride 1, the input gradient is itself a convolution: of the
/// output gradient, padded by `k - 1 - padding` on each side, with the
/// weight's channels swapped and its taps flipped. That runs as one product
/// with `C_out kh kw` terms per output instead of a `C_out`-term product
/// into an unfolded buffer `kh kw` times the input's size that col2im then
/// scatters back. Returns that convolution's shape and weight, or None
/// (stride above 1, or padding beyond `k - 1`).
fn as_forward(s: &ConvShape, weight: &[f32]) -> Option<(ConvShape, Vec<f32>)> {
    let [kh, kw] = s.kernel;
    let [(pt, pb), (pl, pr)] = s.padding;
    if s.stride != [1, 1] || pt.max(pb) >= kh || pl.max(pr) >= kw {
        return None;
    }
    let [ho, wo] = s.output_size()?;
    let transposed = ConvShape {
        batch: s.batch,
        c_in: s.c_out,
        height: ho,
        width: wo,
        c_out: s.c_in,
        kernel: s.kernel,
        stride: [1, 1],
        padding: [(kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)],
    };
    debug_assert_eq!(transposed.output_size(), Some([s.height, s.width]));
    let taps = kh * kw;
    let len = s.c_out * s.c_in * taps;
    let mut flipped = vec![0.0f32; weight.len()];
    // Each group's weight is flipped on its own (see [`GroupedWeights`]).
    for (src_g, dst_g) in weight.chunks_exact(len).zip(flipped.chunks_exact_mut(len)) {
        for co in 0..s.c_out {
            for c in 0..s.c_in {
                let src = &src_g[(co * s.c_in + c) * taps..][..taps];
                let dst = &mut dst_g[(c * s.c_out + co) * taps..][..taps];
                for (d, v) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *v;
                }
            }
        }
    }
    Some((transposed, flipped))
}

/// Height of the zero-padded input, `H + top + bottom`.
fn padded_height(s: &ConvShape) -> usize {
    s.height + s.padding[0].0 + s.padding[0].1
}

/// Values of one example's tap rows ([`unfold_tap_rows`]), `C_in kw Hp Wo`.
fn tap_rows_len(s: &ConvShape) -> usize {
    let [_, wo] = s.output_size().expect("a valid convolution shape");
    s.c_in * s.kernel[1] * padded_height(s) * wo
}

/// Unfolds one stride-1 example `x` `[C_in, H, W]` along the kernel's width
/// only, into `rows` `[C_in kw, Hp Wo]`: row `c kw + j` holds, at column
/// `r Wo + ow`, the zero-padded input `xpad[c, r, ow + j]` that kernel
/// column `j` meets at output column `ow` on padded row `r`. The kernel's
/// `kh` rows are then `kh` shifts of the same buffer: output row `oh` of
/// kernel row `i` reads padded row `oh + i`, columns `(oh + i) Wo ..`, so
/// the product for kernel row `i` is the buffer read from column `i Wo`
/// (see [`forward_tap_rows`]). Every element of `rows` is written.
fn unfold_tap_rows(s: &ConvShape, x: &[f32], rows: &mut [f32]) {
    let [_, wo] = s.output_size().expect("a valid convolution shape");
    let kw = s.kernel[1];
    let (pt, pl) = (s.padding[0].0, s.padding[1].0);
    let (h, w, hp) = (s.height, s.width, padded_height(s));
    for (row, out) in rows.chunks_exact_mut(hp * wo).enumerate() {
        let (c, j) = (row / kw, row % kw);
        let (lo, hi) = s.valid_columns(j, wo);
        let plane = &x[c * h * w..][..h * w];
        let (top, rest) = out.split_at_mut(pt * wo);
        let (inside, bottom) = rest.split_at_mut(h * wo);
        zero_run(top);
        zero_run(bottom);
        if wo == w && lo < hi {
            // The output is as wide as the input ("same" padding): the
            // image's rows are the input plane shifted by `j - left` as a
            // whole, one copy, with the columns that shift wraps across
            // rows (and the plane's first `lead` and last `trail` values,
            // which it leaves alone) zeroed after.
            let (lead, trail) = (lo, w - hi);
            let n = h * w - lead - trail;
            inside[lead..lead + n].copy_from_slice(&plane[trail..trail + n]);
            for r in inside.chunks_exact_mut(w) {
                r[..lead].fill(0.0);
                r[hi..].fill(0.0);
            }
            continue;
        }
        for (r, dst) in inside.chunks_exact_mut(wo).enumerate() {
            zero_run(&mut dst[..lo]);
            zero_run(&mut dst[hi..]);
            if lo < hi {
                let src = &plane[r * w..][..w];
                let start = lo + j - pl;
                copy_run(&mut dst[lo..hi], &src[start..start + hi - lo]);
            }
        }
    }
}

/// Most output channels for which [`TapLayout::PositionMajor`] is worth
/// its transposing copy: with at most this many, the weight-gradient
/// product of [`TapLayout::ChannelMajor`] puts the output channels along
/// `gemm`'s vectors, one or two AVX-512 vectors tall.
const POSITION_MAJOR_MAX_CHANNELS: usize = 32;

/// How [`weight_grad_tap_rows`] lays out an example's tap rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TapLayout {
    /// `[C_in kw, Hp Wo]` ([`unfold_tap_rows`], as the forward pass reads
    /// them): a kernel row's gradient `[C_in kw, C_out]` comes out of
    /// `gemm` with the output channels along its vectors.
    ChannelMajor,
    /// `[Hp Wo, kw C_in]` ([`unfold_tap_columns`]): the gradient comes out
    /// as `[C_out, kw C_in]` with the `kw C_in` taps along the vectors.
    PositionMajor,
}

impl TapLayout {
    /// The faster layout for this shape on this CPU. Measured per example
    /// on ResNet-20's shapes (standalone timings of the `gemm` crate,
    /// RESULTS.md section 23): on AVX-512, position-major runs the
    /// 16-channel stage's products at 89 multiply-adds per ns against 42
    /// and the 32-channel stage's at 84 against 60, which repays its
    /// transposing unfold (13 µs against 5 at 16 channels); with 64
    /// channels the two products run alike and the unfold costs more. On
    /// AVX2 the products run at 46 against 43 multiply-adds per ns and
    /// the unfold loses, so channel-major stays.
    fn for_weight_grad(s: &ConvShape) -> Self {
        if s.c_out <= POSITION_MAJOR_MAX_CHANNELS && has_avx512f() {
            Self::PositionMajor
        } else {
            Self::ChannelMajor
        }
    }
}

/// Whether the CPU has AVX-512F, as `gemm` checks when it picks its
/// micro-kernels (at run time, so one binary serves every x86-64 CPU).
fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Values of one padded input row transposed, `(W + left + right) C_in`
/// ([`unfold_tap_columns`]' scratch).
fn padded_row_len(s: &ConvShape) -> usize {
    (s.width + s.padding[1].0 + s.padding[1].1) * s.c_in
}

/// Unfolds one stride-1 example `x` `[C_in, H, W]` into `cols` `[Hp Wo,
/// kw C_in]`, the transpose of [`unfold_tap_rows`]' buffer with its rows
/// taken tap by tap: row `r Wo + ow` holds, at column `j C_in + c`, the
/// zero-padded input `xpad[c, r, ow + j]`. Kernel row `i` reads rows from
/// `i Wo` on, as in [`forward_tap_rows`]. Each padded input row is
/// transposed once into `row` (`[(W + left + right), C_in]`), where the
/// `kw` taps of output column `ow` are the `kw C_in` values from `ow C_in`
/// on: one copy per output position. Every element of `cols` is written.
fn unfold_tap_columns(s: &ConvShape, x: &[f32], cols: &mut [f32], row: &mut [f32]) {
    let [_, wo] = s.output_size().expect("a valid convolution shape");
    let k = s.c_in * s.kernel[1];
    let (pt, pl) = (s.padding[0].0, s.padding[1].0);
    let (h, w, c_in) = (s.height, s.width, s.c_in);
    let row = &mut row[..padded_row_len(s)];
    row[..pl * c_in].fill(0.0);
    row[(pl + w) * c_in..].fill(0.0);
    for (r, out) in cols.chunks_exact_mut(wo * k).enumerate() {
        if r < pt || r - pt >= h {
            out.fill(0.0);
            continue;
        }
        let ih = r - pt;
        let inside = &mut row[pl * c_in..(pl + w) * c_in];
        for c in 0..c_in {
            let src = &x[(c * h + ih) * w..][..w];
            for (iw, &v) in src.iter().enumerate() {
                inside[iw * c_in + c] = v;
            }
        }
        for (ow, dst) in out.chunks_exact_mut(k).enumerate() {
            copy_run(dst, &row[ow * c_in..][..k]);
        }
    }
}

/// The weight regrouped by kernel row for [`forward_tap_rows`]: for each
/// group's weight and each kernel row `i`, a `[C_out, C_in kw]` matrix
/// whose column `c kw + j` is tap `(i, j)` of input channel `c`,
/// `[G, kh, C_out, C_in kw]` in all.
fn weight_by_kernel_row(s: &ConvShape, weight: &[f32]) -> Vec<f32> {
    let [kh, kw] = s.kernel;
    let len = s.c_out * s.rows();
    let mut out = vec![0.0f32; weight.len()];
    for (src, dst) in weight.chunks_exact(len).zip(out.chunks_exact_mut(len)) {
        for co in 0..s.c_out {
            for c in 0..s.c_in {
                for i in 0..kh {
                    for j in 0..kw {
                        let from = ((co * s.c_in + c) * kh + i) * kw + j;
                        let to = (i * s.c_out + co) * s.c_in * kw + c * kw + j;
                        dst[to] = src[from];
                    }
                }
            }
        }
    }
    out
}

/// The forward pass of a stride-1 convolution as `kh` products per
/// example, one per kernel row, each with `C_in kw` terms: the example's
/// tap rows ([`unfold_tap_rows`], `kw` shifted copies of the padded input
/// instead of im2col's `kh kw`) read from column `i Wo` for kernel row
/// `i`, times that row's weights, accumulated straight into the output
/// (whose `[C_out, Ho Wo]` grid is the products' own: no column is
/// computed and thrown away). Against one product per tap on the padded
/// input, with `C_in` terms each, the products have `kw` times the terms
/// and the output is read and written `kh` times instead of `kh kw`: on
/// ResNet-20's 16-channel stage, gemm's rate goes from about 66 to 95
/// multiply-adds per ns on two threads.
fn forward_tap_rows(s: &ConvShape, x: &[f32], groups: GroupedWeights) -> Vec<f32> {
    let [ho, wo] = s.output_size().expect("a valid convolution shape");
    let kh = s.kernel[0];
    let k = s.c_in * s.kernel[1];
    let (p, hp) = (ho * wo, padded_height(s));
    let (per_in, per_out) = (s.input_len(), s.output_len());
    let by_row = weight_by_kernel_row(s, groups.weight);
    let (per_task, par) = plan(s.batch, 4);
    let example = |n: usize, out_n: &mut [f32]| {
        with_scratch(tap_rows_len(s), |rows| {
            let g = n / groups.per_group;
            let (_, bias) = groups.of(n);
            let weight = &by_row[g * groups.len..][..groups.len];
            unfold_tap_rows(s, &x[n * per_in..][..per_in], rows);
            // The bias goes in first and gemm adds the products to it.
            if let Some(b) = bias {
                for (row, &v) in out_n.chunks_exact_mut(p).zip(b) {
                    row.fill(v);
                }
            }
            for i in 0..kh {
                let w_i = &weight[i * s.c_out * k..][..s.c_out * k];
                let (w_st, rows_st) = ([k, 1], [hp * wo, 1]);
                let add = i > 0 || bias.is_some();
                let mnk = [s.c_out, p, k];
                matmul(mnk, out_n, p, add, w_i, w_st, &rows[i * wo..], rows_st, par);
            }
        });
    };
    output_items(
        s.batch * per_out,
        per_out,
        per_task,
        by_example(par),
        example,
    )
}

/// The weight (and bias) gradient of a stride-1 convolution on
/// [`forward_tap_rows`]' unfolding: kernel row `i`'s gradient is the tap
/// rows read from column `i Wo` times the output gradient transposed,
/// `[C_in kw, Ho Wo] [Ho Wo, C_out]`, accumulated per task as `[kh, C_in
/// kw, C_out]`; or, with [`TapLayout::PositionMajor`], the output
/// gradient times the tap columns read from row `i Wo`, `[C_out, Ho Wo]
/// [Ho Wo, kw C_in]`, accumulated as `[kh, C_out, kw C_in]` (per example
/// or per group as `per_example` asks, as in [`weight_grad`]).
fn weight_grad_tap_rows(
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    with_bias: bool,
    per_example: PerExample,
    layout: TapLayout,
) -> WeightGrads {
    let [ho, wo] = s.output_size().expect("a valid convolution shape");
    let [kh, kw] = s.kernel;
    let k = s.c_in * kw;
    let (p, hp) = (ho * wo, padded_height(s));
    let (per_in, per_out) = (s.input_len(), s.output_len());
    let (per_task, par) = weight_grad_plan(s.batch, per_example);
    let block = k * s.c_out;
    let row_len = match layout {
        TapLayout::ChannelMajor => 0,
        TapLayout::PositionMajor => padded_row_len(s),
    };
    let task = |examples: std::ops::Range<usize>| {
        let mut sums = TaskSums::new(
            kh * block,
            s.c_out,
            with_bias,
            per_example,
            examples.clone(),
        );
        with_scratch(tap_rows_len(s) + row_len, |scratch| {
            let (rows, row) = scratch.split_at_mut(tap_rows_len(s));
            for n in examples {
                let x_n = &x[n * per_in..][..per_in];
                let dy_n = &dy[n * per_out..][..per_out];
                match layout {
                    TapLayout::ChannelMajor => unfold_tap_rows(s, x_n, rows),
                    TapLayout::PositionMajor => unfold_tap_columns(s, x_n, rows, row),
                }
                let (target, add) = sums.target(n);
                for (i, acc) in target.chunks_exact_mut(block).enumerate() {
                    match layout {
                        TapLayout::ChannelMajor => {
                            let (rows_st, dyt_st) = ([hp * wo, 1], [1, p]);
                            let mnk = [k, s.c_out, p];
                            let rows_i = &rows[i * wo..];
                            matmul(mnk, acc, s.c_out, add, rows_i, rows_st, dy_n, dyt_st, par);
                        }
                        TapLayout::PositionMajor => {
                            let (dy_st, cols_st) = ([p, 1], [k, 1]);
                            let mnk = [s.c_out, k, p];
                            let cols_i = &rows[i * wo * k..];
                            matmul(mnk, acc, k, add, dy_n, dy_st, cols_i, cols_st, par);
                        }
                    }
                }
                sums.finish_example(n, dy_n, p);
            }
        });
        sums
    };
    let parts = run_tasks(s.batch, per_task, par, task);
    reduce_tasks(&parts, s.c_out * s.rows(), |idx| {
        let (co, c) = (idx / s.rows(), (idx / (kh * kw)) % s.c_in);
        let (i, j) = ((idx / kw) % kh, idx % kw);
        match layout {
            TapLayout::ChannelMajor => (i * k + c * kw + j) * s.c_out + co,
            TapLayout::PositionMajor => i * block + co * k + j * s.c_in + c,
        }
    })
}

/// The input gradient `[B, c_in, H, W]` of the convolution, from its weight
/// (or one weight per group of examples, as in [`forward`]) and the output
/// gradient `dy` `[B, c_out, H', W']`.
pub fn input_grad(s: &ConvShape, weight: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, p, per_in, per_out) = (s.rows(), s.positions(), s.input_len(), s.output_len());
    let groups = GroupedWeights::new(s, weight, None);
    assert_eq!(dy.len(), s.batch * per_out);
    if let Some((transposed, flipped)) = as_forward(s, weight) {
        return forward(&transposed, dy, &flipped, None);
    }
    let (per_task, par) = plan(s.batch, 4);
    // Wᵀ is the weight read with its strides swapped.
    let (wt_st, dy_st) = ([1, k], [p, 1]);
    let example = |n: usize, dx_n: &mut [f32]| {
        let scratch = if s.is_pointwise() { 0 } else { k * p };
        with_scratch(scratch, |dcol| {
            let dy_n = &dy[n * per_out..][..per_out];
            let (weight, _) = groups.of(n);
            let mnk = [k, p, s.c_out];
            if s.is_pointwise() {
                matmul(mnk, dx_n, p, false, weight, wt_st, dy_n, dy_st, par);
            } else {
                matmul(mnk, dcol, p, false, weight, wt_st, dy_n, dy_st, par);
                dx_n.fill(0.0);
                col2im_add(s, dcol, dx_n);
            }
        });
    };
    output_items(s.batch * per_in, per_in, per_task, by_example(par), example)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The valid output columns are exactly those whose input column lies
    /// inside the image, for every offset, stride and padding up to 3.
    #[test]
    fn valid_columns_are_the_inside_ones() {
        for width in 1..7 {
            for k in 1..4 {
                for sw in 1..4 {
                    for pl in 0..3 {
                        for pr in 0..3 {
                            let s = ConvShape {
                                batch: 1,
                                c_in: 1,
                                height: 1,
                                width,
                                c_out: 1,
                                kernel: [1, k],
                                stride: [1, sw],
                                padding: [(0, 0), (pl, pr)],
                            };
                            let Some([_, wo]) = s.output_size() else {
                                continue;
                            };
                            for j in 0..k {
                                let inside: Vec<usize> = (0..wo)
                                    .filter(|&ow| {
                                        let iw = (ow * sw + j) as isize - pl as isize;
                                        iw >= 0 && iw < width as isize
                                    })
                                    .collect();
                                let (lo, hi) = s.valid_columns(j, wo);
                                assert_eq!(inside, (lo..hi).collect::<Vec<_>>(), "{s:?} j {j}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Both tap layouts' weight gradients (the batch's alone, and with the
    /// per-example squares' sums or the groups' sums; the bias's) against a
    /// float64 loop over the padded input, on shapes with square and
    /// rectangular kernels, symmetric and lopsided padding, and a kernel
    /// column that meets no input, with scratch space poisoned. Each
    /// element is within 1e-5 of its terms' magnitudes (the sum of their
    /// absolute values, or for a square twice the product of that and the
    /// value): `f32` products over at most 42 positions round each partial
    /// sum by at most about 42 × 6e-8 of those magnitudes.
    #[test]
    fn both_tap_layouts_give_the_weight_gradients_of_a_float64_loop() {
        // Scratch space starts as NaN: a value the unfolding leaves unwritten
        // shows.
        crate::kernels::poison_outputs(true);
        let cases = [
            (
                [8usize, 3],
                [6usize, 7],
                [3usize, 3],
                [(1usize, 1usize), (1usize, 1usize)],
            ),
            ([9, 5], [5, 6], [2, 3], [(0, 1), (2, 0)]),
            ([8, 4], [4, 2], [3, 5], [(1, 1), (2, 2)]),
        ];
        for ([c_in, c_out], [height, width], kernel, padding) in cases {
            let s = ConvShape {
                batch: 4,
                c_in,
                height,
                width,
                c_out,
                kernel,
                stride: [1, 1],
                padding,
            };
            assert!(s.uses_taps(), "{s:?}");
            let [ho, wo] = s.output_size().unwrap();
            let value = |i: usize, f: f32| ((i as f32) * f).sin();
            let x: Vec<f32> = (0..s.batch * s.input_len())
                .map(|i| value(i, 0.61))
                .collect();
            let dy: Vec<f32> = (0..s.batch * s.output_len())
                .map(|i| value(i, 0.37))
                .collect();
            // Per example: the gradient and its terms' absolute sums.
            let numel = c_out * s.rows();
            let [kh, kw] = kernel;
            let per_example: Vec<(Vec<f64>, Vec<f64>)> = (0..s.batch)
                .map(|n| {
                    let (mut g, mut a) = (vec![0.0f64; numel], vec![0.0f64; numel]);
                    for co in 0..c_out {
                        for c in 0..c_in {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let idx = ((co * c_in + c) * kh + i) * kw + j;
                                    for oh in 0..ho {
                                        for ow in 0..wo {
                                            let (r, q) = (oh + i, ow + j);
                                            if r < padding[0].0 || q < padding[1].0 {
                                                continue;
                                            }
                                            let (ih, iw) = (r - padding[0].0, q - padding[1].0);
                                            if ih >= height || iw >= width {
                                                continue;
                                            }
                                            let xv = x[((n * c_in + c) * height + ih) * width + iw];
                                            let dv = dy[((n * c_out + co) * ho + oh) * wo + ow];
                                            let t = xv as f64 * dv as f64;
                                            g[idx] += t;
                                            a[idx] += t.abs();
                                        }
                                    }
                                }
                            }
                        }
                    }
                    (g, a)
                })
                .collect();
            let check = |what: &str, got: &[f32], want: &[f64], scale: &[f64]| {
                assert_eq!(got.len(), want.len(), "{what}");
                for (e, ((&g, &w), &a)) in got.iter().zip(want).zip(scale).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-5 * a + 1e-30,
                        "{what} {s:?} element {e}: {g} against {w} (terms {a})"
                    );
                }
            };
            let sum_over = |range: std::ops::Range<usize>, f: &dyn Fn(usize, usize) -> f64| {
                (0..numel)
                    .map(|e| range.clone().map(|n| f(n, e)).sum())
                    .collect::<Vec<f64>>()
            };
            let all = 0..s.batch;
            let weight = sum_over(all.clone(), &|n, e| per_example[n].0[e]);
            let weight_scale = sum_over(all.clone(), &|n, e| per_example[n].1[e]);
            let squares = sum_over(all.clone(), &|n, e| per_example[n].0[e].powi(2));
            let squares_scale = sum_over(all.clone(), &|n, e| {
                2.0 * per_example[n].0[e].abs() * per_example[n].1[e]
            });
            let channel_sums = |f: fn(f32) -> f64| -> Vec<f64> {
                (0..c_out)
                    .map(|co| {
                        (0..s.batch)
                            .map(|n| {
                                let row = &dy[(n * c_out + co) * ho * wo..][..ho * wo];
                                row.iter().map(|&v| f(v)).sum::<f64>()
                            })
                            .sum()
                    })
                    .collect()
            };
            let bias = channel_sums(|v| v as f64);
            let bias_scale = channel_sums(|v| v.abs() as f64);
            for layout in [TapLayout::ChannelMajor, TapLayout::PositionMajor] {
                let what = format!("{layout:?}");
                let g = weight_grad_tap_rows(&s, &x, &dy, true, PerExample::Nothing, layout);
                check(&format!("{what} plain"), &g.weight, &weight, &weight_scale);
                check(&format!("{what} plain bias"), &g.bias, &bias, &bias_scale);
                let g = weight_grad_tap_rows(&s, &x, &dy, true, PerExample::Squares, layout);
                check(&format!("{what} weight"), &g.weight, &weight, &weight_scale);
                check(&format!("{what} bias"), &g.bias, &bias, &bias_scale);
                let sq = g.squares.expect("squares were asked for");
                check(
                    &format!("{what} squares"),
                    &sq.weight,
                    &squares,
                    &squares_scale,
                );
                let g = weight_grad_tap_rows(&s, &x, &dy, false, PerExample::Groups(2), layout);
                let groups = g.groups.expect("groups were asked for");
                assert_eq!(groups.groups, 2);
                for (t, got) in groups.weight.chunks_exact(numel).enumerate() {
                    let range = 2 * t..2 * t + 2;
                    let want = sum_over(range.clone(), &|n, e| per_example[n].0[e]);
                    let scale = sum_over(range, &|n, e| per_example[n].1[e]);
                    check(&format!("{what} group {t}"), got, &want, &scale);
                }
                check(
                    &format!("{what} grouped batch"),
                    &g.weight,
                    &weight,
                    &weight_scale,
                );
            }
        }
    }
}
