//! From token sequences to training batches: padding with length grouping,
//! or packing several examples per row with attention that never crosses an
//! example's boundary and positions that restart at each example.

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// One example ready for training: `input[i]` predicts `target[i]`, trained
/// when `mask[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub input: Vec<i64>,
    pub target: Vec<i64>,
    pub mask: Vec<bool>,
}

impl Sequence {
    /// Shifts a tokenized example (`ids` with `loss_mask`) into next-token
    /// pairs: the mask of a pair is that of the token predicted.
    pub fn from_ids(ids: &[i64], loss_mask: &[bool]) -> Option<Self> {
        if ids.len() < 2 {
            return None;
        }
        Some(Sequence {
            input: ids[..ids.len() - 1].to_vec(),
            target: ids[1..].to_vec(),
            mask: loss_mask[1..].to_vec(),
        })
    }

    pub fn len(&self) -> usize {
        self.input.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }

    pub fn trained(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Keep the first `max_seq_len` pairs.
    #[default]
    Truncate,
    /// Leave the example out.
    Drop,
}

/// Applies the truncation policy. Returns the kept sequences and the numbers
/// truncated and dropped (examples left with nothing to train are dropped).
pub fn apply_truncation(
    seqs: Vec<Sequence>,
    max_len: usize,
    policy: Truncation,
) -> (Vec<Sequence>, usize, usize) {
    let (mut truncated, mut dropped) = (0, 0);
    let mut out = Vec::with_capacity(seqs.len());
    for mut s in seqs {
        if s.len() > max_len {
            match policy {
                Truncation::Drop => {
                    dropped += 1;
                    continue;
                }
                Truncation::Truncate => {
                    s.input.truncate(max_len);
                    s.target.truncate(max_len);
                    s.mask.truncate(max_len);
                    truncated += 1;
                }
            }
        }
        if s.trained() == 0 {
            dropped += 1;
            continue;
        }
        out.push(s);
    }
    (out, truncated, dropped)
}

/// Cuts a sequence longer than `max_len` pairs into windows of at most
/// `max_len` pairs, one starting every `stride` pairs (`stride` ≤
/// `max_len`; `stride == max_len`: no overlap). Where windows overlap, the
/// pairs a window shares with the one before are context only (mask false),
/// so every pair of the sequence is trained once. The last window ends at
/// the sequence's end; a sequence of at most `max_len` pairs is one window.
pub fn windows(seq: &Sequence, max_len: usize, stride: usize) -> Vec<Sequence> {
    let n = seq.len();
    if n <= max_len {
        return vec![seq.clone()];
    }
    let stride = stride.clamp(1, max_len);
    let mut out = vec![];
    let (mut start, mut covered) = (0usize, 0usize); // covered: pairs trained by earlier windows
    loop {
        let end = (start + max_len).min(n);
        let mut mask = seq.mask[start..end].to_vec();
        mask[..covered.saturating_sub(start)].iter_mut().for_each(|m| *m = false);
        out.push(Sequence {
            input: seq.input[start..end].to_vec(),
            target: seq.target[start..end].to_vec(),
            mask,
        });
        if end == n {
            return out;
        }
        covered = end;
        start += stride;
    }
}

/// A row plan: which sequences (by index) share one row.
pub type Row = Vec<usize>;

/// Packs sequences, in order, into rows of at most `max_len` tokens (first
/// fit in order: a sequence that does not fit starts a new row).
pub fn pack_rows(seqs: &[Sequence], order: &[usize], max_len: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = vec![];
    let mut cur: Row = vec![];
    let mut used = 0;
    for &i in order {
        let n = seqs[i].len();
        if used + n > max_len && !cur.is_empty() {
            rows.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(i);
        used += n;
    }
    if !cur.is_empty() {
        rows.push(cur);
    }
    rows
}

/// The batches of one epoch, as lists of rows. With packing, rows are packed
/// in `order`; without, sequences are grouped by length within windows of
/// `64 × batch_size` so that padding is small, one sequence per row. Batch
/// order is then shuffled from `seed` (a pure function of its inputs, so a
/// resumed run sees the same batches).
pub fn plan_epoch(
    seqs: &[Sequence],
    order: &[usize],
    batch_size: usize,
    max_len: usize,
    packing: bool,
    seed: u64,
) -> Vec<Vec<Row>> {
    let rows: Vec<Row> = if packing {
        pack_rows(seqs, order, max_len)
    } else {
        let mut rows = vec![];
        for window in order.chunks(batch_size * 64) {
            let mut w = window.to_vec();
            w.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
            rows.extend(w.into_iter().map(|i| vec![i]));
        }
        rows
    };
    let mut batches: Vec<Vec<Row>> = rows.chunks(batch_size).map(|c| c.to_vec()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    batches.shuffle(&mut rng);
    batches
}

/// Tensors of one micro-batch.
pub struct Batch {
    pub input: Tensor,     // (B, T) int64
    pub target: Tensor,    // (B, T) int64
    pub mask: Tensor,      // (B, T) bool: trained positions
    pub positions: Tensor, // (B, T) int64, restarting per example
    /// (B, 1, T, T) bool; None when every row is one unpadded example
    /// (plain causal attention, the fast path).
    pub attn: Option<Tensor>,
    pub tokens: usize,  // real (non-pad) tokens
    pub trained: usize, // trained tokens
}

/// Builds the tensors for `rows` (each a list of sequence indices) padded on
/// the right to the longest row. `pad_id` fills padding.
pub fn make_batch(seqs: &[Sequence], rows: &[Row], pad_id: i64, device: Device) -> Result<Batch> {
    if rows.is_empty() {
        bail!("empty batch");
    }
    let t = rows.iter().map(|r| r.iter().map(|&i| seqs[i].len()).sum::<usize>()).max().unwrap_or(0);
    let b = rows.len();
    let mut input = vec![pad_id; b * t];
    let mut target = vec![pad_id; b * t];
    let mut mask = vec![false; b * t];
    let mut pos = vec![0i64; b * t];
    let mut seg = vec![0i64; b * t]; // 0 = padding, 1.. = example within the row
    let (mut tokens, mut trained) = (0, 0);
    for (r, row) in rows.iter().enumerate() {
        let mut off = r * t;
        for (k, &i) in row.iter().enumerate() {
            let s = &seqs[i];
            let n = s.len();
            input[off..off + n].copy_from_slice(&s.input);
            target[off..off + n].copy_from_slice(&s.target);
            mask[off..off + n].copy_from_slice(&s.mask);
            for j in 0..n {
                pos[off + j] = j as i64;
                seg[off + j] = k as i64 + 1;
            }
            tokens += n;
            trained += s.trained();
            off += n;
        }
    }
    let (bi, ti) = (b as i64, t as i64);
    let plain = rows.iter().all(|r| r.len() == 1 && seqs[r[0]].len() == t);
    let seg = Tensor::from_slice(&seg).view([bi, ti]).to_device(device); // (B, T)
    let q = seg.unsqueeze(2); // (B, T, 1)
    let k = seg.unsqueeze(1); // (B, 1, T)
    let same = q.eq_tensor(&k).logical_and(&q.ne(0)); // (B, T, T)
    let causal = Tensor::ones([ti, ti], (Kind::Bool, device)).tril(0); // (T, T)
    let diag = Tensor::eye(ti, (Kind::Bool, device)); // (T, T)
    let attn = (!plain).then(|| same.logical_and(&causal).logical_or(&diag).unsqueeze(1)); // (B, 1, T, T)
    Ok(Batch {
        input: Tensor::from_slice(&input).view([bi, ti]).to_device(device),
        target: Tensor::from_slice(&target).view([bi, ti]).to_device(device),
        mask: Tensor::from_slice(&mask).view([bi, ti]).to_device(device),
        positions: Tensor::from_slice(&pos).view([bi, ti]).to_device(device),
        attn,
        tokens,
        trained,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize) -> Sequence {
        Sequence { input: (0..n as i64).collect(), target: (1..=n as i64).collect(), mask: vec![true; n] }
    }

    #[test]
    fn windows_cover_a_long_sequence_and_train_each_pair_once() {
        let s = seq(10);
        let w = windows(&s, 4, 4);
        assert_eq!(w.iter().map(Sequence::len).collect::<Vec<_>>(), vec![4, 4, 2]);
        let targets: Vec<i64> = w.iter().flat_map(|x| x.target.clone()).collect();
        assert_eq!(targets, s.target);
        assert!(w.iter().all(|x| x.mask.iter().all(|&m| m)));
        // Overlapping windows: the shared pairs are context only.
        let w = windows(&s, 4, 3);
        assert_eq!(w.iter().map(|x| x.input[0]).collect::<Vec<_>>(), vec![0, 3, 6]);
        assert_eq!(w[1].mask, vec![false, true, true, true]);
        assert_eq!(w[2].mask, vec![false, true, true, true]);
        let trained: Vec<i64> =
            w.iter().flat_map(|x| x.target.iter().zip(&x.mask).filter(|p| *p.1).map(|p| *p.0)).collect();
        assert_eq!(trained, s.target);
        assert_eq!(windows(&seq(4), 4, 2), vec![seq(4)]);
    }

    #[test]
    fn packing_fills_rows_in_order_without_exceeding_max_len() {
        let s = vec![seq(3), seq(4), seq(2), seq(5)];
        let rows = pack_rows(&s, &[0, 1, 2, 3], 8);
        assert_eq!(rows, vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn packed_attention_is_block_diagonal_and_positions_restart() {
        let s = vec![seq(2), seq(3)];
        let b = make_batch(&s, &[vec![0, 1]], 0, Device::Cpu).unwrap();
        assert!(make_batch(&s, &[vec![1]], 0, Device::Cpu).unwrap().attn.is_none());
        let pos: Vec<i64> = Vec::try_from(b.positions.view([-1])).unwrap();
        assert_eq!(pos, vec![0, 1, 0, 1, 2]);
        let a: Vec<bool> = Vec::try_from(b.attn.unwrap().view([-1])).unwrap();
        #[rustfmt::skip]
        let want = [
            true,  false, false, false, false,
            true,  true,  false, false, false,
            false, false, true,  false, false,
            false, false, true,  true,  false,
            false, false, true,  true,  true,
        ];
        assert_eq!(a, want);
    }

    #[test]
    fn truncation_policy_is_applied_and_counted() {
        let (kept, t, d) = apply_truncation(vec![seq(3), seq(10)], 5, Truncation::Truncate);
        assert_eq!((kept.len(), t, d), (2, 1, 0));
        assert_eq!(kept[1].len(), 5);
        let (kept, t, d) = apply_truncation(vec![seq(3), seq(10)], 5, Truncation::Drop);
        assert_eq!((kept.len(), t, d), (1, 0, 1));
    }

    #[test]
    fn epoch_plan_is_a_pure_function_of_the_seed() {
        let s: Vec<Sequence> = (1..40).map(seq).collect();
        let order: Vec<usize> = (0..s.len()).collect();
        let a = plan_epoch(&s, &order, 4, 64, false, 9);
        assert_eq!(a, plan_epoch(&s, &order, 4, 64, false, 9));
        assert_ne!(a, plan_epoch(&s, &order, 4, 64, false, 10));
        let all: usize = a.iter().map(|b| b.len()).sum();
        assert_eq!(all, s.len());
    }
}
