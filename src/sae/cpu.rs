//! CPU kernels for SAE training on plain row-major `f32` slices.
//!
//! Why not candle ops: a TopK SAE step only needs one dense product (the encoder). Decoding
//! and every gradient touch just the active latents, so they are written here as gathers and
//! per-latent scatters over an [`Active`] set — `B·k·d_in` work instead of `B·d_sae·d_in` —
//! and the optimiser updates parameters in place instead of allocating new tensors each step.

use rayon::prelude::*;

/// Rows handed to one rayon task in elementwise loops.
const CHUNK: usize = 1 << 14;

/// Values scanned per block by the top-k selection.
const BLOCK: usize = 32;

/// A row-major matrix operand of [`matmul`], optionally read transposed.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    /// Rows and columns as stored.
    pub rows: usize,
    pub cols: usize,
    /// Use the transpose of the stored matrix.
    pub transposed: bool,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    /// (rows, cols) as used, and (row stride, column stride) of that view.
    fn view(&self) -> ((usize, usize), (isize, isize)) {
        let (r, c) = (self.rows, self.cols);
        if self.transposed {
            ((c, r), (1, c as isize))
        } else {
            ((r, c), (c as isize, 1))
        }
    }
}

/// `out = a · b`, or `out += a · b` when `accumulate`; `out` is row-major `[a.rows, b.cols]`.
pub fn matmul(a: MatRef, b: MatRef, out: &mut [f32], accumulate: bool) {
    let ((m, k), (a_rs, a_cs)) = a.view();
    let ((k2, n), (b_rs, b_cs)) = b.view();
    assert_eq!(k, k2, "matmul inner dimensions");
    assert_eq!(out.len(), m * n, "matmul output size");
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above and `MatRef::new` guarantee every index gemm computes from
    // these sizes and strides lies inside the three slices, which do not overlap (`out` is
    // borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The active latents of a batch, row by row (compressed sparse rows): row `b` owns pairs
/// `row_start[b]..row_start[b + 1]`, each a latent index and its activation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Active {
    pub row_start: Vec<usize>,
    pub latent: Vec<u32>,
    pub value: Vec<f32>,
}

impl Active {
    pub fn rows(&self) -> usize {
        self.row_start.len().saturating_sub(1)
    }

    pub fn len(&self) -> usize {
        self.latent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latent.is_empty()
    }

    /// Builds the set from per-row lists.
    pub fn from_rows(rows: Vec<Vec<(u32, f32)>>) -> Self {
        let mut out = Active {
            row_start: Vec::with_capacity(rows.len() + 1),
            ..Default::default()
        };
        out.row_start.push(0);
        let total = rows.iter().map(Vec::len).sum();
        out.latent.reserve(total);
        out.value.reserve(total);
        for row in rows {
            for (j, v) in row {
                out.latent.push(j);
                out.value.push(v);
            }
            out.row_start.push(out.latent.len());
        }
        out
    }

    /// The pairs of row `b`.
    pub fn row(&self, b: usize) -> (&[u32], &[f32]) {
        let r = self.row_start[b]..self.row_start[b + 1];
        (&self.latent[r.clone()], &self.value[r])
    }

    /// The same pairs grouped by latent (see [`ByLatent`]).
    pub fn by_latent(&self, d_sae: usize) -> ByLatent {
        let mut start = vec![0usize; d_sae + 1];
        for &j in &self.latent {
            start[j as usize + 1] += 1;
        }
        for j in 0..d_sae {
            start[j + 1] += start[j];
        }
        let mut fill = start.clone();
        let mut pair = vec![0u32; self.len()];
        let mut row = vec![0u32; self.len()];
        for b in 0..self.rows() {
            for p in self.row_start[b]..self.row_start[b + 1] {
                let j = self.latent[p] as usize;
                pair[fill[j]] = p as u32;
                row[fill[j]] = b as u32;
                fill[j] += 1;
            }
        }
        ByLatent { start, pair, row }
    }
}

/// The pairs of an [`Active`] set grouped by latent (a counting-sort transpose), so that
/// per-latent gradients are written by one task each, deterministically.
pub struct ByLatent {
    /// Latent `j` owns entries `start[j]..start[j + 1]`.
    pub start: Vec<usize>,
    /// Index of the pair in the [`Active`] arrays.
    pub pair: Vec<u32>,
    /// The pair's row.
    pub row: Vec<u32>,
}

/// Per row of `pre` (`[rows, d_sae]`, to which `bias` is added on the fly), the `k` largest
/// values that are also positive (TopK followed by ReLU), in descending order.
pub fn top_k_rows(pre: &[f32], bias: &[f32], k: usize) -> Active {
    top_k_rows_where(pre, bias, k, |_| true)
}

/// [`top_k_rows`] restricted to latents where `allowed(j)` (AuxK over dead latents).
pub fn top_k_rows_where(
    pre: &[f32],
    bias: &[f32],
    k: usize,
    allowed: impl Fn(usize) -> bool + Sync,
) -> Active {
    let d_sae = bias.len();
    let rows: Vec<Vec<(u32, f32)>> = pre
        .par_chunks(d_sae)
        .map(|row| {
            // `best` stays sorted descending; a value enters only if it beats `bar` (0 until
            // `best` is full, then its last value). Blocks whose maximum cannot enter are
            // skipped with one well-predicted branch: the scan is mostly vector max.
            let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
            let mut bar = 0.0f32;
            for (block, (pb, bb)) in row.chunks(BLOCK).zip(bias.chunks(BLOCK)).enumerate() {
                let mut max = f32::NEG_INFINITY;
                for (&p, &b) in pb.iter().zip(bb) {
                    let v = p + b;
                    max = if v > max { v } else { max };
                }
                if max <= bar {
                    continue;
                }
                for (i, (&p, &b)) in pb.iter().zip(bb).enumerate() {
                    let v = p + b;
                    let j = block * BLOCK + i;
                    if v <= bar || !allowed(j) {
                        continue;
                    }
                    let at = best.partition_point(|&(_, w)| w >= v);
                    best.insert(at, (j as u32, v));
                    best.truncate(k);
                    if best.len() == k {
                        bar = best[k - 1].1;
                    }
                }
            }
            best
        })
        .collect();
    Active::from_rows(rows)
}

/// Per row, every latent whose value (`pre + bias`) passes `keep(j, value)`.
pub fn select_rows(pre: &[f32], bias: &[f32], keep: impl Fn(usize, f32) -> bool + Sync) -> Active {
    let d_sae = bias.len();
    let rows: Vec<Vec<(u32, f32)>> = pre
        .par_chunks(d_sae)
        .map(|row| {
            row.iter()
                .zip(bias)
                .enumerate()
                .filter_map(|(j, (&p, &b))| {
                    let v = p + b;
                    keep(j, v).then_some((j as u32, v))
                })
                .collect()
        })
        .collect();
    Active::from_rows(rows)
}

/// `out[b] = bias + Σ_p value[p] · w_dec[latent[p]]` over row `b`'s pairs: decoding through
/// the selected rows of `w_dec` (`[d_sae, d_in]`) only.
pub fn sparse_decode(active: &Active, w_dec: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let d_in = out.len() / active.rows().max(1);
    out.par_chunks_mut(d_in).enumerate().for_each(|(b, o)| {
        match bias {
            Some(bias) => o.copy_from_slice(bias),
            None => o.fill(0.0),
        }
        let (latents, values) = active.row(b);
        for (&j, &v) in latents.iter().zip(values) {
            axpy(v, &w_dec[j as usize * d_in..][..d_in], o);
        }
    });
}

/// Nested dictionaries (Matryoshka SAEs, Bussmann et al. 2025): latent `j` belongs to group
/// `group(j)`, the number of prefix ends at or below `j`, and an output gradient has one row
/// per (batch row, group) — `[rows, groups, d_in]` — since a group's latents appear in every
/// prefix reconstruction from their own on. [`Nesting::NONE`]: one group, `[rows, d_in]`.
#[derive(Clone, Copy, Debug)]
pub struct Nesting<'a> {
    /// Exclusive ends of the prefixes before the whole dictionary, ascending.
    pub ends: &'a [usize],
}

impl Nesting<'_> {
    pub const NONE: Nesting<'static> = Nesting { ends: &[] };

    pub fn groups(&self) -> usize {
        self.ends.len() + 1
    }

    #[inline]
    pub fn group(&self, latent: usize) -> usize {
        self.ends.partition_point(|&e| e <= latent)
    }

    /// Where the output-gradient row for batch row `b` and `latent` starts.
    #[inline]
    fn offset(&self, b: usize, latent: usize, d_in: usize) -> usize {
        (b * self.groups() + self.group(latent)) * d_in
    }
}

/// `dot(g[row(p), group(latent[p])], w_dec[latent[p]])` for every pair: the gradient reaching
/// each activation.
pub fn pair_dots(
    active: &Active,
    g: &[f32],
    w_dec: &[f32],
    d_in: usize,
    nesting: Nesting,
) -> Vec<f32> {
    let mut out = vec![0f32; active.len()];
    // Split the output by rows so each task owns a contiguous range.
    let mut rest = out.as_mut_slice();
    let mut pieces = Vec::with_capacity(active.rows());
    for b in 0..active.rows() {
        let (head, tail) = rest.split_at_mut(active.row_start[b + 1] - active.row_start[b]);
        pieces.push((b, head));
        rest = tail;
    }
    pieces.into_par_iter().for_each(|(b, o)| {
        let (latents, _) = active.row(b);
        for (o, &j) in o.iter_mut().zip(latents) {
            let j = j as usize;
            let g_row = &g[nesting.offset(b, j, d_in)..][..d_in];
            *o = dot(g_row, &w_dec[j * d_in..][..d_in]);
        }
    });
    out
}

/// The per-latent gradients of one [`Active`] set, accumulated (`+=`) into the outputs:
/// - `g_w_dec[j] += Σ value[p] · g_out[row(p), group(j)]` (decoder rows),
/// - `g_w_enc_t[j] += Σ g_pre[p] · x_in[row(p)]` (encoder columns, stored as rows),
/// - `g_b_enc[j] += Σ g_pre[p]`.
///
/// `x_in` and encoder rows are `d_in` wide; `g_out` and decoder rows `d_out` (a transcoder's
/// output width; `d_in` for an SAE).
///
/// Parallel over latents; each latent's sum runs in row order, so results are deterministic.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_latent_grads(
    active: &Active,
    by_latent: &ByLatent,
    g_out: &[f32],
    nesting: Nesting,
    g_pre: &[f32],
    x_in: &[f32],
    d_in: usize,
    d_out: usize,
    g_w_dec: &mut [f32],
    g_w_enc_t: &mut [f32],
    g_b_enc: &mut [f32],
) {
    g_w_dec
        .par_chunks_mut(d_out)
        .zip(g_w_enc_t.par_chunks_mut(d_in))
        .zip(g_b_enc.par_iter_mut())
        .enumerate()
        .for_each(|(j, ((gd, ge), gb))| {
            for e in by_latent.start[j]..by_latent.start[j + 1] {
                let p = by_latent.pair[e] as usize;
                let b = by_latent.row[e] as usize;
                axpy(
                    active.value[p],
                    &g_out[nesting.offset(b, j, d_out)..][..d_out],
                    gd,
                );
                axpy(g_pre[p], &x_in[b * d_in..][..d_in], ge);
                *gb += g_pre[p];
            }
        });
}

/// `y += a·x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Dot product with eight independent accumulators, so the compiler vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Sum of squares, in parallel.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| f64::from(v * v)).sum::<f64>())
        .sum()
}

/// Column sums of a row-major `[rows, cols]` matrix, in f64.
pub fn column_sums(x: &[f32], cols: usize) -> Vec<f64> {
    column_sums_of_rows(x, cols, 1)
}

/// Column sums of rows `0, stride, 2·stride, …` of a row-major matrix, in f64 (group 0 of
/// a [`Nesting`]'s `[rows, groups, d_in]` gradient).
pub fn column_sums_of_rows(x: &[f32], cols: usize, stride: usize) -> Vec<f64> {
    let mut out = vec![0f64; cols];
    for row in x.chunks_exact(cols).step_by(stride) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += f64::from(v);
        }
    }
    out
}

/// `Σ_rows ‖row − mean‖²` of a row-major `[rows, cols]` matrix: the denominator of FVU.
pub fn total_variance(x: &[f32], cols: usize) -> f64 {
    let rows = x.len() / cols;
    if rows == 0 {
        return 0.0;
    }
    let mean: Vec<f64> = column_sums(x, cols)
        .into_iter()
        .map(|s| s / rows as f64)
        .collect();
    x.par_chunks(cols * 64)
        .map(|block| {
            block
                .chunks_exact(cols)
                .map(|row| {
                    row.iter()
                        .zip(&mean)
                        .map(|(&v, &m)| (f64::from(v) - m).powi(2))
                        .sum::<f64>()
                })
                .sum::<f64>()
        })
        .sum()
}

/// One Adam step on a parameter slice, in place.
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1-based step count, for the bias corrections.
    pub t: u64,
}

impl AdamStep {
    pub fn apply(&self, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
        let c1 = 1.0 - self.beta1.powi(self.t as i32);
        let c2 = 1.0 - self.beta2.powi(self.t as i32);
        let step = self.lr / c1;
        let c2_sqrt = c2.sqrt();
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= step * *m / (v.sqrt() / c2_sqrt + eps);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        out
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = x[r * cols + c];
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matmul_handles_every_transpose_and_accumulates() {
        let (m, k, n) = (7, 5, 9);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let expected = naive_matmul(&a, &b, m, k, n);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (a_ref, b_ref) in [
            (MatRef::new(&a, m, k), MatRef::new(&b, k, n)),
            (MatRef::new(&at, k, m).t(), MatRef::new(&b, k, n)),
            (MatRef::new(&a, m, k), MatRef::new(&bt, n, k).t()),
            (MatRef::new(&at, k, m).t(), MatRef::new(&bt, n, k).t()),
        ] {
            let mut out = vec![1f32; m * n];
            matmul(a_ref, b_ref, &mut out, true);
            for (o, e) in out.iter().zip(&expected) {
                assert!((o - (e + 1.0)).abs() < 1e-4, "{o} vs {}", e + 1.0);
            }
        }
    }

    #[test]
    fn top_k_keeps_the_largest_positive_values_in_order() {
        let pre = [
            0.5, -1.0, 3.0, 2.0, 0.1, /* row 2 */ -1.0, -2.0, -3.0, 0.2, -0.5,
        ];
        let bias = [0.0, 0.0, 0.0, 0.0, -0.05];
        let active = top_k_rows(&pre, &bias, 3);
        assert_eq!(active.row(0).0, &[2, 3, 0]);
        assert_eq!(active.row(0).1, &[3.0, 2.0, 0.5]);
        // Only one positive value in the second row.
        assert_eq!(active.row(1).0, &[3]);
    }

    #[test]
    fn sparse_products_match_dense_ones() {
        let (rows, d_sae, d_in) = (6, 10, 4);
        let pre = values(rows * d_sae, 3);
        let active = top_k_rows(&pre, &vec![0.0; d_sae], 3);
        let mut dense = vec![0f32; rows * d_sae];
        for b in 0..rows {
            let (l, v) = active.row(b);
            for (&j, &v) in l.iter().zip(v) {
                dense[b * d_sae + j as usize] = v;
            }
        }
        let w_dec = values(d_sae * d_in, 4);
        let mut decoded = vec![0f32; rows * d_in];
        sparse_decode(&active, &w_dec, None, &mut decoded);
        let expected = naive_matmul(&dense, &w_dec, rows, d_sae, d_in);
        for (a, e) in decoded.iter().zip(&expected) {
            assert!((a - e).abs() < 1e-5);
        }
        // Gradients against their dense definitions.
        let g = values(rows * d_in, 5);
        let x = values(rows * d_in, 6);
        let dots = pair_dots(&active, &g, &w_dec, d_in, Nesting::NONE);
        let g_acts_dense = naive_matmul(&g, &transpose(&w_dec, d_sae, d_in), rows, d_in, d_sae);
        for b in 0..rows {
            let r = active.row_start[b]..active.row_start[b + 1];
            for p in r {
                let j = active.latent[p] as usize;
                assert!((dots[p] - g_acts_dense[b * d_sae + j]).abs() < 1e-5);
            }
        }
        let mut g_w_dec = vec![0f32; d_sae * d_in];
        let mut g_w_enc_t = vec![0f32; d_sae * d_in];
        let mut g_b_enc = vec![0f32; d_sae];
        accumulate_latent_grads(
            &active,
            &active.by_latent(d_sae),
            &g,
            Nesting::NONE,
            &dots,
            &x,
            d_in,
            d_in,
            &mut g_w_dec,
            &mut g_w_enc_t,
            &mut g_b_enc,
        );
        let expected = naive_matmul(&transpose(&dense, rows, d_sae), &g, d_sae, rows, d_in);
        for (a, e) in g_w_dec.iter().zip(&expected) {
            assert!((a - e).abs() < 1e-5);
        }
        let mut g_pre_dense = vec![0f32; rows * d_sae];
        for b in 0..rows {
            for p in active.row_start[b]..active.row_start[b + 1] {
                g_pre_dense[b * d_sae + active.latent[p] as usize] = dots[p];
            }
        }
        let expected = naive_matmul(&transpose(&g_pre_dense, rows, d_sae), &x, d_sae, rows, d_in);
        for (a, e) in g_w_enc_t.iter().zip(&expected) {
            assert!((a - e).abs() < 1e-5);
        }
    }
}
