//! Packing encoded conversations into training rows.
//!
//! `pack`: best-fit-decreasing bin packing of whole conversations into rows of at most
//! `capacity` tokens; `position_ids` restart at 0 for every conversation and each row
//! records its conversations' lengths, which the model uses to keep attention inside each
//! conversation. `pad`: one conversation per row (padding happens per batch, later).

use std::collections::BTreeSet;

use super::tokenizer::EncodedChat;

/// One output row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub position_ids: Vec<u32>,
    /// Lengths of the conversations in this row, in order; they sum to the row length.
    pub seq_lengths: Vec<u32>,
}

impl Row {
    pub fn push(&mut self, c: &EncodedChat) {
        let n = c.input_ids.len();
        self.input_ids.extend_from_slice(&c.input_ids);
        self.labels.extend_from_slice(&c.labels);
        self.position_ids.extend(0..n as u32);
        self.seq_lengths.push(n as u32);
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Best-fit decreasing: items sorted by length (longest first, ties by index), each put in
/// the open bin with the least room that still fits it, or a new bin. Returns the bins (in
/// the order they were opened) as item indices (in the order they were placed).
/// Deterministic; O(n log n). Items longer than `capacity` get a bin of their own.
pub fn best_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = vec![];
    // (room left, bin index): the first entry with room >= len is the best fit.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lengths[i];
        let found = open.range((len, 0)..).next().copied();
        match found {
            Some((room, b)) => {
                open.remove(&(room, b));
                bins[b].push(i);
                if room - len > 0 {
                    open.insert((room - len, b));
                }
            }
            None => {
                bins.push(vec![i]);
                let room = capacity.saturating_sub(len);
                if room > 0 {
                    open.insert((room, bins.len() - 1));
                }
            }
        }
    }
    bins
}

/// Rows of packed conversations.
pub fn pack_rows(convs: &[EncodedChat], capacity: usize) -> Vec<Row> {
    let lengths: Vec<usize> = convs.iter().map(|c| c.input_ids.len()).collect();
    best_fit_decreasing(&lengths, capacity)
        .into_iter()
        .map(|bin| {
            let mut row = Row::default();
            for i in bin {
                row.push(&convs[i]);
            }
            row
        })
        .collect()
}

/// One row per conversation, in input order.
pub fn single_rows(convs: &[EncodedChat]) -> Vec<Row> {
    convs
        .iter()
        .map(|c| {
            let mut row = Row::default();
            row.push(c);
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chat(id: u32, len: usize) -> EncodedChat {
        // Token k of conversation `id` is id * 10_000 + k, so every token is traceable.
        let ids: Vec<u32> = (0..len as u32).map(|k| id * 10_000 + k).collect();
        let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
        labels[0] = -100;
        EncodedChat {
            input_ids: ids,
            labels,
            truncated: false,
        }
    }

    proptest! {
        #[test]
        fn packing_keeps_every_conversation_whole_once(
            lens in proptest::collection::vec(1usize..64, 0..200),
            capacity in 64usize..256,
        ) {
            let convs: Vec<_> = lens.iter().enumerate().map(|(i, &l)| chat(i as u32, l)).collect();
            let rows = pack_rows(&convs, capacity);
            let mut seen = vec![0u32; convs.len()];
            for row in &rows {
                prop_assert!(row.len() <= capacity);
                prop_assert_eq!(row.seq_lengths.iter().sum::<u32>() as usize, row.len());
                prop_assert_eq!(row.labels.len(), row.len());
                prop_assert_eq!(row.position_ids.len(), row.len());
                let mut at = 0usize;
                for &n in &row.seq_lengths {
                    let n = n as usize;
                    let id = row.input_ids[at] / 10_000;
                    // The segment is exactly conversation `id`: not split, nothing lost.
                    prop_assert_eq!(&row.input_ids[at..at + n], &convs[id as usize].input_ids[..]);
                    prop_assert_eq!(&row.labels[at..at + n], &convs[id as usize].labels[..]);
                    prop_assert_eq!(row.labels[at], -100);
                    let expect: Vec<u32> = (0..n as u32).collect();
                    prop_assert_eq!(&row.position_ids[at..at + n], &expect[..]);
                    seen[id as usize] += 1;
                    at += n;
                }
            }
            prop_assert!(seen.iter().all(|&s| s == 1));
            // A row is opened only when its first conversation fits in no open row, so no
            // two rows could have been merged into one.
            for (i, a) in rows.iter().enumerate() {
                for b in &rows[i + 1..] {
                    prop_assert!(a.len() + b.len() > capacity);
                }
            }
        }

        #[test]
        fn packing_is_deterministic(lens in proptest::collection::vec(1usize..50, 0..100)) {
            let a = best_fit_decreasing(&lens, 100);
            let b = best_fit_decreasing(&lens, 100);
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn best_fit_fills_the_tightest_bin() {
        // 7 opens bin 0 (room 3), 6 opens bin 1 (room 4), 3 goes to bin 0 (tightest fit),
        // 4 to bin 1.
        assert_eq!(
            best_fit_decreasing(&[3, 7, 4, 6], 10),
            vec![vec![1, 0], vec![3, 2]]
        );
    }
}
