//! Receipts of one Ack, Nack or ExtendVisibility call, grouped by the partition they
//! name: the broker settles each group on its partition, the sidecar sends each group
//! to the partition's owner. Either way every receipt gets an answer, in the order the
//! call gave them, and a malformed receipt gets its own `INVALID_ARGUMENT` answer
//! without failing the rest. (The receipt format itself is `sluice_proto::receipt`.)

use sluice_proto::{Receipt, v1};
use std::collections::BTreeMap;
use tonic::Code;

use crate::validate::Invalid;

/// What a settle call does to its receipts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOp {
    Ack,
    Nack { delay_ms: u64, dead_letter: bool },
    Extend { visibility_ms: u64 },
}

/// Parses every receipt of a call; a call must name at least one.
pub fn parse_receipts(receipts: &[String]) -> Result<Vec<Result<Receipt, &'static str>>, Invalid> {
    if receipts.is_empty() {
        return Err(Invalid::new("no receipts given"));
    }
    Ok(receipts.iter().map(|r| r.parse::<Receipt>()).collect())
}

/// One call's receipts by partition, and the answers collected so far.
#[derive(Debug)]
pub struct Settlement<'a> {
    receipts: &'a [String],
    answers: Vec<Option<v1::ReceiptResult>>,
    groups: BTreeMap<u32, Vec<(usize, Receipt)>>,
}

impl<'a> Settlement<'a> {
    /// Groups `receipts` by partition; malformed ones are answered at once.
    pub fn new(receipts: &'a [String]) -> Result<Self, Invalid> {
        let parsed = parse_receipts(receipts)?;
        let mut answers = vec![None; receipts.len()];
        let mut groups: BTreeMap<u32, Vec<(usize, Receipt)>> = BTreeMap::new();
        for (i, p) in parsed.into_iter().enumerate() {
            match p {
                Ok(r) => groups.entry(r.partition).or_default().push((i, r)),
                Err(why) => answers[i] = Some(result(&receipts[i], Code::InvalidArgument, why)),
            }
        }
        Ok(Settlement {
            receipts,
            answers,
            groups,
        })
    }

    /// The receipts still to answer, by partition: (partition, [(index, receipt)]).
    pub fn take_groups(&mut self) -> BTreeMap<u32, Vec<(usize, Receipt)>> {
        std::mem::take(&mut self.groups)
    }

    /// The receipt text of index `i`, as the call gave it.
    pub fn receipt(&self, i: usize) -> &'a str {
        &self.receipts[i]
    }

    /// Answers receipt `i` with `answer`.
    pub fn answer(&mut self, i: usize, answer: v1::ReceiptResult) {
        self.answers[i] = Some(answer);
    }

    /// Answers receipt `i` with `code` (OK when the receipt was settled) and `error`.
    pub fn answer_code(&mut self, i: usize, code: Code, error: &str) {
        self.answers[i] = Some(result(self.receipts[i].as_str(), code, error));
    }

    /// Every answer, in the call's order.
    ///
    /// # Panics
    /// If a receipt was left unanswered.
    pub fn finish(self) -> Vec<v1::ReceiptResult> {
        self.answers
            .into_iter()
            .map(|r| r.expect("every receipt answered"))
            .collect()
    }
}

/// The answer about one receipt.
pub fn result(receipt: &str, code: Code, error: &str) -> v1::ReceiptResult {
    v1::ReceiptResult {
        receipt: receipt.to_string(),
        code: code as i32,
        error: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_partition_and_answers_in_order() {
        let rs: Vec<String> = [
            Receipt {
                partition: 2,
                seq: 1,
                delivery: 1,
            }
            .to_string(),
            "garbage".to_string(),
            Receipt {
                partition: 0,
                seq: 5,
                delivery: 1,
            }
            .to_string(),
            Receipt {
                partition: 2,
                seq: 7,
                delivery: 3,
            }
            .to_string(),
        ]
        .into();
        let mut s = Settlement::new(&rs).unwrap();
        let groups = s.take_groups();
        let shape: Vec<(u32, Vec<usize>)> = groups
            .iter()
            .map(|(p, items)| (*p, items.iter().map(|x| x.0).collect()))
            .collect();
        assert_eq!(shape, [(0, vec![2]), (2, vec![0, 3])]);
        for items in groups.values() {
            for (i, _) in items {
                s.answer_code(*i, Code::Ok, "");
            }
        }
        let out = s.finish();
        assert_eq!(out.len(), 4);
        assert_eq!(out[1].code, Code::InvalidArgument as i32);
        assert_eq!(out[1].receipt, "garbage");
        assert_eq!(out[3].receipt, rs[3]);
        assert!(Settlement::new(&[]).is_err());
    }
}
