//! Gaps in a partition's offsets: which ones are worth a warning.
//!
//! Kafka allows gaps (compaction removes records, each transaction leaves a control marker
//! the consumer never sees, aborted transactions' records are skipped under read_committed),
//! so a gap is never an error. But on a topic that is neither compacted nor transactional a
//! gap means records the broker did not return, and the stored offset moving past them would
//! lose them without a word (tansu 0.6.0's in-memory engine did exactly that). Whether a topic
//! is compacted is asked of the broker at startup; whether it is transactional the consumer
//! cannot ask, so it learns it: a gap of exactly one offset is what a committed transaction's
//! marker leaves, and once one is seen the topic's gaps are expected.

use std::collections::HashMap;

/// What a gap on a topic means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Gap {
    /// Unexplained: `missing` offsets returned no record. Warn and count.
    Unexplained { missing: i64 },
    /// A one-offset gap on a topic not known to be transactional until now: a transaction
    /// marker, and from now on the topic's gaps are expected.
    FirstMarker,
    /// On a compacted or transactional topic: expected.
    Expected,
}

/// Per topic, whether its gaps are expected.
#[derive(Debug, Default)]
pub(super) struct Gaps {
    expected: HashMap<String, bool>,
}

impl Gaps {
    /// Records whether `topic` is compacted (its gaps are then expected).
    pub(super) fn set_compacted(&mut self, topic: &str, compacted: bool) {
        self.expected.insert(topic.to_owned(), compacted);
    }

    /// A record of `topic` arrived at `offset` where `expected` was due; `None` if that is
    /// no gap.
    pub(super) fn classify(&mut self, topic: &str, expected: i64, offset: i64) -> Option<Gap> {
        if offset <= expected {
            return None;
        }
        let known = self.expected.entry(topic.to_owned()).or_insert(false);
        if *known {
            return Some(Gap::Expected);
        }
        if offset == expected + 1 {
            *known = true;
            return Some(Gap::FirstMarker);
        }
        Some(Gap::Unexplained {
            missing: offset - expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_on_a_plain_topic_is_unexplained_and_stays_so() {
        let mut gaps = Gaps::default();
        gaps.set_compacted("orders", false);
        assert_eq!(gaps.classify("orders", 10, 10), None);
        assert_eq!(
            gaps.classify("orders", 10, 16),
            Some(Gap::Unexplained { missing: 6 })
        );
        assert_eq!(
            gaps.classify("orders", 20, 23),
            Some(Gap::Unexplained { missing: 3 })
        );
    }

    #[test]
    fn gaps_on_a_compacted_topic_are_expected() {
        let mut gaps = Gaps::default();
        gaps.set_compacted("latest", true);
        assert_eq!(gaps.classify("latest", 0, 1000), Some(Gap::Expected));
    }

    #[test]
    fn after_a_transaction_marker_the_topics_gaps_are_expected() {
        let mut gaps = Gaps::default();
        gaps.set_compacted("payments", false);
        assert_eq!(gaps.classify("payments", 5, 6), Some(Gap::FirstMarker));
        // An aborted transaction's records and its marker, later on.
        assert_eq!(gaps.classify("payments", 20, 26), Some(Gap::Expected));
        // Another topic learns nothing from it.
        assert_eq!(
            gaps.classify("orders", 5, 8),
            Some(Gap::Unexplained { missing: 3 })
        );
    }
}
