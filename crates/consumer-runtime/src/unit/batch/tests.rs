//! The batch handler's unit of work on both databases, without Kafka: one call per batch, the
//! records it receives, `reject(index)` in the batch's transaction, isolation of a failure
//! that names no record by splitting the batch (poison first, middle, last, several, a
//! panic), a retry that then succeeds, a batch of one, the other guarantees, and redrive. The
//! effect is non-idempotent (`count = count + 1` per event id) and every assertion is on rows.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use sqlx::Pool;

use crate::config::Guarantee;
use crate::dead_letters::{DeadLetter, Redriven};
use crate::error::FailureKind;
use crate::event_id::EventId;
use crate::handler::{Batch, BatchHandler, Batched, HandlerError, Json};
use crate::store::{Claim, PartitionKey};
use crate::test_support::*;
use crate::unit::{BatchError, BatchOutcome, PartitionWriter, WriterConfig};

/// How the test batch handler fails on its poison event ids.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Poison {
    /// `batch.reject(index, …)` for each poison record, `Ok(())` for the call.
    RejectIndex,
    /// `Err(Reject)` for the whole call, after writing every record's effect.
    RejectCall,
    /// A panic, after writing every record's effect.
    Panic,
    /// `Err(Retry)` for the whole call, after writing every record's effect: a record that
    /// never stops failing.
    Retry,
}

/// The test batch handler: applies the non-idempotent effect for every record of its batch
/// (skipping the ones it rejects), then fails as `mode` says if a poison id is in the batch.
/// It records the event ids of every call.
#[derive(Clone)]
struct BatchCounter {
    group: String,
    poison: HashSet<String>,
    mode: Poison,
    /// Calls still to answer with `Retry` (after writing the effects).
    retries: Arc<Mutex<u32>>,
    /// The event ids and the attempt of each call, in order.
    calls: Arc<Mutex<Calls>>,
}

/// Each call's event ids and attempt.
type Calls = Vec<(Vec<String>, u32)>;

impl BatchCounter {
    fn new(group: &str, poison: &[String], mode: Poison) -> Self {
        BatchCounter {
            group: group.to_owned(),
            poison: poison.iter().cloned().collect(),
            mode,
            retries: Arc::new(Mutex::new(0)),
            calls: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn calls(&self) -> Calls {
        self.calls.lock().unwrap().clone()
    }
}

impl<DB: TestDb> BatchHandler<DB> for BatchCounter {
    type Event = Json<serde_json::Value>;

    async fn handle_batch(
        &self,
        conn: &mut DB::Connection,
        batch: &Batch<'_, Json<serde_json::Value>>,
    ) -> Result<(), HandlerError> {
        let ids: Vec<String> = batch
            .records()
            .iter()
            .map(|r| r.event_id().to_owned())
            .collect();
        self.calls
            .lock()
            .unwrap()
            .push((ids.clone(), batch.attempt()));
        // The payload is {"id": <event id>}: the decoded events are the batch's.
        for ((record, Json(event)), id) in batch.iter().zip(&ids) {
            assert_eq!(event["id"].as_str(), Some(record.event_id()));
            assert_eq!(record.event_id(), id);
        }
        let mut poisoned = false;
        for (i, id) in ids.iter().enumerate() {
            if self.poison.contains(id) {
                poisoned = true;
                if self.mode == Poison::RejectIndex {
                    batch.reject(i, format!("test rejects {id}"));
                    continue;
                }
            }
            DB::apply_effect(conn, &self.group, id).await?;
        }
        {
            let mut retries = self.retries.lock().unwrap();
            if *retries > 0 {
                *retries -= 1;
                return Err(HandlerError::retry("test asks for a retry"));
            }
        }
        match (poisoned, self.mode) {
            (true, Poison::RejectCall) => Err(HandlerError::reject("test rejects the batch")),
            (true, Poison::Panic) => panic!("test panics on the batch"),
            (true, Poison::Retry) => Err(HandlerError::retry("test fails the batch")),
            _ => Ok(()),
        }
    }
}

/// `n` records at offsets 0..n with event ids `{group}-{offset}`, payload `{"id": id}`.
fn batch_of(topic: &str, group: &str, n: i64) -> Vec<OwnedMessage> {
    (0..n)
        .map(|o| message(topic, o, &format!("{group}-{o}")))
        .collect()
}

fn message(topic: &str, offset: i64, id: &str) -> OwnedMessage {
    let headers = OwnedHeaders::new().insert(Header {
        key: "event-id",
        value: Some(id.as_bytes()),
    });
    OwnedMessage::new(
        Some(format!(r#"{{"id":"{id}"}}"#).into_bytes()),
        Some(id.as_bytes().to_vec()),
        topic.to_owned(),
        Timestamp::CreateTime(1_700_000_000_000 + offset),
        0,
        offset,
        Some(headers),
    )
}

fn ids(group: &str, offsets: impl IntoIterator<Item = i64>) -> Vec<String> {
    offsets
        .into_iter()
        .map(|o| format!("{group}-{o}"))
        .collect()
}

async fn setup<DB: TestDb>(prefix: &str) -> (Pool<DB>, String, PartitionKey, Claim) {
    let pool = DB::pool().await;
    let group = rand_name("g");
    let key = PartitionKey {
        group: group.clone(),
        topic: rand_name(prefix),
        partition: 0,
    };
    let claim = DB::claim(&pool, &queries::<DB>(), &key, "me")
        .await
        .unwrap();
    (pool, group, key, claim)
}

fn writer<DB: TestDb>(
    pool: &Pool<DB>,
    handler: &BatchCounter,
    guarantee: Guarantee,
    key: &PartitionKey,
    claim: Claim,
) -> PartitionWriter<Batched<BatchCounter>, DB> {
    let config = Arc::new(WriterConfig {
        handler: Arc::new(Batched(handler.clone())),
        pool: pool.clone(),
        queries: queries::<DB>(),
        guarantee,
        event_id: EventId::default(),
    });
    PartitionWriter::new(config, key.clone(), claim).park_failures(true)
}

async fn parked<DB: TestDb>(pool: &Pool<DB>, group: &str) -> Vec<DeadLetter> {
    store(pool).dead_letters().list(group, None).await.unwrap()
}

async fn in_ledger<DB: TestDb>(pool: &Pool<DB>, group: &str, id: &str) -> bool {
    !DB::ledger_known(pool, &queries::<DB>(), group, &[id])
        .await
        .unwrap()
        .is_empty()
}

/// Writes a batch of `n` with the poison offsets `bad` under `mode` and checks the outcome:
/// the others applied once, the poison parked as `kind` and unclaimed, the offset at `n`.
async fn poison_is_isolated<DB: TestDb>(mode: Poison, n: i64, bad: &[i64]) -> BatchCounter {
    let (pool, group, key, claim) = setup::<DB>("bpoison").await;
    let poison = ids(&group, bad.iter().copied());
    let handler = BatchCounter::new(&group, &poison, mode);
    let mut w = writer(&pool, &handler, Guarantee::EffectivelyOnce, &key, claim);
    let batch = batch_of(&key.topic, &group, n);
    if mode == Poison::Retry {
        // The worker's retry loop with `max_attempts = 3`: three rolled-back tries, then it
        // gives up on the batch's first record, which sends the batch into the search.
        for attempt in 1..=3 {
            w.set_attempt(attempt);
            match w.write(&batch).await {
                Err(BatchError::Transient {
                    at: Some(at),
                    infrastructure: false,
                    ..
                }) => {
                    assert_eq!(at.offset, 0);
                    assert!(effect_counts(&pool, &group).await.is_empty());
                    if attempt == 3 {
                        w.give_up(&at, "test fails the batch (after 3 attempts)".into(), 3);
                    }
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        w.set_attempt(1);
    }
    let outcome = w.write(&batch).await.unwrap();
    let good = n as usize - bad.len();
    assert_eq!(
        outcome,
        BatchOutcome::Committed {
            applied: good,
            duplicates: 0,
            lost: 0,
            next_offset: n
        },
        "{mode:?} {bad:?}"
    );
    let good_ids = ids(&group, (0..n).filter(|o| !bad.contains(o)));
    assert_exactly_once(&effect_counts(&pool, &group).await, &good_ids);
    let letters = parked(&pool, &group).await;
    let parked_offsets: Vec<i64> = letters.iter().map(|l| l.offset).collect();
    assert_eq!(parked_offsets, bad, "{mode:?}: {letters:?}");
    let kind = match mode {
        Poison::Panic => FailureKind::Panicked,
        Poison::Retry => FailureKind::RetriesExhausted,
        _ => FailureKind::Rejected,
    };
    for l in &letters {
        assert_eq!(l.kind, kind, "{l:?}");
        assert_eq!(l.attempts, if mode == Poison::Retry { 3 } else { 1 });
        let expected = match mode {
            Poison::RejectIndex => format!("test rejects {}", l.event_id.as_deref().unwrap()),
            Poison::RejectCall => "test rejects the batch".to_owned(),
            Poison::Panic => "test panics on the batch".to_owned(),
            Poison::Retry => "test fails the batch (its batch failed 3 times)".to_owned(),
        };
        assert!(l.error.contains(&expected), "{}", l.error);
        assert!(!in_ledger(&pool, &group, l.event_id.as_deref().unwrap()).await);
    }
    assert_eq!(ledger_rows(&pool, &group).await, good as i64);
    assert_eq!(
        stored_offsets(&pool, &group).await[&(key.topic.clone(), 0)],
        n
    );
    assert_eq!(w.position(), Some(n));
    handler
}

// ---- One call per batch ------------------------------------------------------------------------

async fn one_call_receives_the_newly_claimed_records_in_offset_order<DB: TestDb>() {
    let (pool, group, key, claim) = setup::<DB>("bcall").await;
    let handler = BatchCounter::new(&group, &[], Poison::RejectCall);
    let mut w = writer(&pool, &handler, Guarantee::EffectivelyOnce, &key, claim);
    // Offsets 0 and 1 (a and b) commit first.
    let id = |n: &str| format!("{group}-{n}");
    let first = vec![
        message(&key.topic, 0, &id("a")),
        message(&key.topic, 1, &id("b")),
    ];
    w.write(&first).await.unwrap();
    // Then a (ledger duplicate), c, c (in-batch repeat), b (duplicate), d, and a record
    // without an event id (parked before the call).
    let mut second = vec![
        message(&key.topic, 2, &id("a")),
        message(&key.topic, 3, &id("c")),
        message(&key.topic, 4, &id("c")),
        message(&key.topic, 5, &id("b")),
        message(&key.topic, 6, &id("d")),
    ];
    second.push(OwnedMessage::new(
        Some(br#"{"id":"none"}"#.to_vec()),
        None,
        key.topic.clone(),
        Timestamp::CreateTime(1_700_000_000_007),
        0,
        7,
        None,
    ));
    let outcome = w.write(&second).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome::Committed {
            applied: 2,
            duplicates: 3,
            lost: 0,
            next_offset: 8
        }
    );
    let calls = handler.calls();
    assert_eq!(
        calls,
        vec![(vec![id("a"), id("b")], 1), (vec![id("c"), id("d")], 1)],
        "one call per batch, with the new records only"
    );
    assert_exactly_once(
        &effect_counts(&pool, &group).await,
        &[id("a"), id("b"), id("c"), id("d")],
    );
    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].offset, letters[0].kind),
        (7, FailureKind::MissingEventId)
    );
}

// ---- Poison isolation --------------------------------------------------------------------------

async fn rejected_indices_are_parked_in_the_one_transaction<DB: TestDb>() {
    let handler = poison_is_isolated::<DB>(Poison::RejectIndex, 8, &[0, 3, 7]).await;
    assert_eq!(
        handler.calls().len(),
        1,
        "reject(index) needs no second call"
    );
}

async fn a_rejected_call_isolates_poison_first_middle_and_last<DB: TestDb>() {
    for bad in [0, 4, 9] {
        let handler = poison_is_isolated::<DB>(Poison::RejectCall, 10, &[bad]).await;
        let calls = handler.calls();
        // The whole batch, then halves down to the culprit alone: about 2·log2(10) calls.
        assert!(calls.len() <= 9, "{bad}: {} calls", calls.len());
        let (last_alone, _) = calls
            .iter()
            .rev()
            .find(|(ids, _)| ids.len() == 1 && handler.poison.contains(&ids[0]))
            .expect("the culprit ran alone");
        assert_eq!(last_alone.len(), 1);
        // Every good record's last run is in a committed half: no record ran after its commit
        // (checked by the exactly-once counts in poison_is_isolated).
    }
}

async fn a_rejected_call_isolates_several_poison_records<DB: TestDb>() {
    poison_is_isolated::<DB>(Poison::RejectCall, 12, &[1, 5, 6, 11]).await;
}

async fn a_panicking_call_is_isolated_and_parked_as_panicked<DB: TestDb>() {
    poison_is_isolated::<DB>(Poison::Panic, 7, &[2]).await;
}

async fn a_batch_of_one_is_parked_or_applied<DB: TestDb>() {
    for mode in [Poison::RejectIndex, Poison::RejectCall, Poison::Panic] {
        let handler = poison_is_isolated::<DB>(mode, 1, &[0]).await;
        assert_eq!(
            handler.calls().len(),
            1,
            "{mode:?}: the culprit is alone at once"
        );
    }
    poison_is_isolated::<DB>(Poison::RejectCall, 1, &[]).await;
}

async fn a_retry_rolls_the_batch_back_and_the_next_try_commits<DB: TestDb>() {
    let (pool, group, key, claim) = setup::<DB>("bretry").await;
    let handler = BatchCounter::new(&group, &[], Poison::RejectCall);
    *handler.retries.lock().unwrap() = 1;
    let mut w = writer(&pool, &handler, Guarantee::EffectivelyOnce, &key, claim);
    let batch = batch_of(&key.topic, &group, 5);
    w.set_attempt(1);
    let err = w.write(&batch).await.unwrap_err();
    assert!(
        matches!(
            err,
            BatchError::Transient {
                at: Some(ref at),
                infrastructure: false,
                ..
            } if at.offset == 0
        ),
        "{err:?}"
    );
    assert!(
        effect_counts(&pool, &group).await.is_empty(),
        "the retry left effects"
    );
    assert_eq!(ledger_rows(&pool, &group).await, 0);
    assert_eq!(w.position(), None);
    w.set_attempt(2);
    let outcome = w.write(&batch).await.unwrap();
    assert!(matches!(
        outcome,
        BatchOutcome::Committed {
            applied: 5,
            next_offset: 5,
            ..
        }
    ));
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids(&group, 0..5));
    let attempts: Vec<u32> = handler.calls().iter().map(|(_, a)| *a).collect();
    assert_eq!(attempts, vec![1, 2]);
}

async fn poison_is_isolated_under_the_other_guarantees<DB: TestDb>() {
    for guarantee in [Guarantee::AtLeastOnce, Guarantee::AtMostOnce] {
        let (pool, group, key, claim) = setup::<DB>("bguar").await;
        let poison = ids(&group, [3]);
        let handler = BatchCounter::new(&group, &poison, Poison::RejectCall);
        let mut w = writer(&pool, &handler, guarantee, &key, claim);
        let outcome = w.write(&batch_of(&key.topic, &group, 6)).await.unwrap();
        assert!(
            matches!(
                outcome,
                BatchOutcome::Committed {
                    applied: 5,
                    lost: 0,
                    next_offset: 6,
                    ..
                }
            ),
            "{guarantee}: {outcome:?}"
        );
        assert_exactly_once(
            &effect_counts(&pool, &group).await,
            &ids(&group, [0, 1, 2, 4, 5]),
        );
        let letters = parked(&pool, &group).await;
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].offset, 3);
        assert_eq!(
            ledger_rows(&pool, &group).await,
            0,
            "{guarantee} keeps no ledger"
        );
        assert_eq!(
            stored_offsets(&pool, &group).await[&(key.topic.clone(), 0)],
            6
        );
    }
}

async fn a_parked_record_of_a_batch_handler_is_redriven_once<DB: TestDb>() {
    let (pool, group, key, claim) = setup::<DB>("bredrive").await;
    let bad = format!("{group}-1");
    let handler = BatchCounter::new(&group, std::slice::from_ref(&bad), Poison::RejectCall);
    let mut w = writer(&pool, &handler, Guarantee::EffectivelyOnce, &key, claim);
    w.write(&batch_of(&key.topic, &group, 3)).await.unwrap();
    let letter = parked(&pool, &group).await[0].id;
    let strategy = EventId::default();

    // Still poison: a batch of one that fails, the dead letter stays.
    let again = store(&pool)
        .dead_letters()
        .redrive(&Batched(handler.clone()), &strategy, letter)
        .await
        .unwrap();
    assert!(
        matches!(
            again,
            Redriven::Failed {
                kind: FailureKind::Rejected,
                ..
            }
        ),
        "{again:?}"
    );
    // Fixed: applied once, then gone.
    let fixed = BatchCounter::new(&group, &[], Poison::RejectCall);
    let done = store(&pool)
        .dead_letters()
        .redrive(&Batched(fixed.clone()), &strategy, letter)
        .await
        .unwrap();
    assert_eq!(
        done,
        Redriven::Applied {
            event_id: bad.clone()
        }
    );
    assert_eq!(fixed.calls(), vec![(vec![bad.clone()], 1)]);
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids(&group, 0..3));
    assert!(in_ledger(&pool, &group, &bad).await);
    assert!(parked(&pool, &group).await.is_empty());
}

async fn a_call_that_never_stops_asking_for_a_retry_parks_its_culprit_after_max_attempts<
    DB: TestDb,
>() {
    poison_is_isolated::<DB>(Poison::Retry, 9, &[4]).await;
    poison_is_isolated::<DB>(Poison::Retry, 1, &[0]).await;
}

suite!(
    a_call_that_never_stops_asking_for_a_retry_parks_its_culprit_after_max_attempts,
    one_call_receives_the_newly_claimed_records_in_offset_order,
    rejected_indices_are_parked_in_the_one_transaction,
    a_rejected_call_isolates_poison_first_middle_and_last,
    a_rejected_call_isolates_several_poison_records,
    a_panicking_call_is_isolated_and_parked_as_panicked,
    a_batch_of_one_is_parked_or_applied,
    a_retry_rolls_the_batch_back_and_the_next_try_commits,
    poison_is_isolated_under_the_other_guarantees,
    a_parked_record_of_a_batch_handler_is_redriven_once,
);
