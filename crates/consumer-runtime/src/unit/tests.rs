//! The unit of work on its own, without Kafka: fencing and rollback, duplicates within a
//! batch, the event-id strategies, parking permanent failures in the batch's transaction (the
//! fast and the slow path), and redrive, which runs the same per-record step. Each test is
//! generic over the database and runs on both ([`suite!`]); the assertions are on database rows
//! (effects, ledger rows, stored offsets, dead letters).

use std::sync::Arc;

use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use sqlx::Pool;

use super::{BatchError, BatchOutcome, PartitionWriter, WriterConfig};
use crate::config::Guarantee;
use crate::dead_letters::{DeadLetter, Redriven};
use crate::error::FailureKind;
use crate::event_id::EventId;
use crate::handler::Json;
use crate::store::{Claim, PartitionKey, Queries};
use crate::test_support::*;

// ---- Helpers ---------------------------------------------------------------------------------

/// A record with a JSON payload, key `key` and the headers given (the event id is one of them
/// if the test wants one).
fn record(
    topic: &str,
    offset: i64,
    key: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
    payload: Option<&[u8]>,
) -> OwnedMessage {
    let mut h = OwnedHeaders::new();
    for (name, value) in headers {
        h = h.insert(Header {
            key: name,
            value: *value,
        });
    }
    OwnedMessage::new(
        payload.map(<[u8]>::to_vec),
        key.map(<[u8]>::to_vec),
        topic.to_owned(),
        Timestamp::CreateTime(1_700_000_000_000 + offset),
        0,
        offset,
        Some(h),
    )
}

/// One [`message`] per name, at offsets 0, 1, …, with event id `{group}-{name}`.
fn messages(topic: &str, group: &str, names: &[&str]) -> Vec<OwnedMessage> {
    names
        .iter()
        .enumerate()
        .map(|(o, n)| message(topic, o as i64, &format!("{group}-{n}")))
        .collect()
}

/// The usual record of partition 0: key and `event-id` header both `id`, payload `{"id": id}`.
fn message(topic: &str, offset: i64, id: &str) -> OwnedMessage {
    let payload = format!(r#"{{"id":"{id}"}}"#);
    record(
        topic,
        offset,
        Some(id.as_bytes()),
        &[("event-id", Some(id.as_bytes()))],
        Some(payload.as_bytes()),
    )
}

fn config_with<DB: TestDb>(
    pool: &Pool<DB>,
    handler: Counter,
    guarantee: Guarantee,
    event_id: EventId<Json<serde_json::Value>>,
) -> Arc<WriterConfig<Counter, DB>> {
    Arc::new(WriterConfig {
        handler: Arc::new(handler),
        pool: pool.clone(),
        queries: queries::<DB>(),
        guarantee,
        event_id,
    })
}

fn config<DB: TestDb>(
    pool: &Pool<DB>,
    handler: Counter,
    guarantee: Guarantee,
) -> Arc<WriterConfig<Counter, DB>> {
    config_with(pool, handler, guarantee, EventId::default())
}

fn writer_config<DB: TestDb>(pool: &Pool<DB>, handler: Counter) -> Arc<WriterConfig<Counter, DB>> {
    config(pool, handler, Guarantee::EffectivelyOnce)
}

fn writer_config_with<DB: TestDb>(
    pool: &Pool<DB>,
    handler: Counter,
    event_id: EventId<Json<serde_json::Value>>,
) -> Arc<WriterConfig<Counter, DB>> {
    config_with(pool, handler, Guarantee::EffectivelyOnce, event_id)
}

/// A pool, a fresh group, partition 0 of a fresh topic, and the runtime's SQL.
async fn fresh<DB: TestDb>(prefix: &str) -> (Pool<DB>, String, PartitionKey, Queries) {
    let pool = DB::pool().await;
    let group = rand_name("g");
    let key = PartitionKey {
        group: group.clone(),
        topic: rand_name(prefix),
        partition: 0,
    };
    (pool, group, key, queries::<DB>())
}

/// [`fresh`], with the partition claimed.
async fn unit_setup<DB: TestDb>(prefix: &str) -> (Pool<DB>, String, PartitionKey, Claim) {
    let (pool, group, key, q) = fresh::<DB>(prefix).await;
    let claim = DB::claim(&pool, &q, &key, "me").await.unwrap();
    (pool, group, key, claim)
}

/// A writer that parks failures, as the runtime's do.
fn parking_writer<DB: TestDb>(
    pool: &Pool<DB>,
    handler: Counter,
    guarantee: Guarantee,
    key: &PartitionKey,
    claim: Claim,
) -> PartitionWriter<Counter, DB> {
    PartitionWriter::new(config(pool, handler, guarantee), key.clone(), claim).park_failures(true)
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

fn ids(group: &str, offsets: impl IntoIterator<Item = i64>) -> Vec<String> {
    offsets
        .into_iter()
        .map(|o| format!("{group}-{o}"))
        .collect()
}

// ---- Fencing, rollback, duplicates, event ids ------------------------------------------------

async fn stale_epoch_cannot_commit_and_leaves_nothing_visible<DB: TestDb>() {
    let (pool, group, key, q) = fresh::<DB>("fence").await;
    let config = writer_config(&pool, Counter::new(&group));

    let old = DB::claim(&pool, &q, &key, "zombie").await.unwrap();
    let mut zombie = PartitionWriter::new(config.clone(), key.clone(), old);
    let new = DB::claim(&pool, &q, &key, "owner").await.unwrap();
    assert!(new.epoch > old.epoch);

    let batch: Vec<_> = (0..5)
        .map(|o| message(&key.topic, o, &format!("{group}-{o}")))
        .collect();
    assert_eq!(zombie.write(&batch).await.unwrap(), BatchOutcome::Fenced);
    assert!(
        effect_counts(&pool, &group).await.is_empty(),
        "a fenced batch left effects"
    );
    assert_eq!(
        ledger_rows(&pool, &group).await,
        0,
        "a fenced batch left ledger rows"
    );
    assert!(
        stored_offsets(&pool, &group).await.is_empty(),
        "a fenced batch moved the offset"
    );

    // The current owner commits the same batch.
    let mut owner = PartitionWriter::new(config, key.clone(), new);
    assert!(matches!(
        owner.write(&batch).await.unwrap(),
        BatchOutcome::Committed { applied: 5, .. }
    ));
    assert_eq!(
        stored_offsets(&pool, &group).await[&(key.topic.clone(), 0)],
        5
    );
}

async fn handler_error_rolls_back_the_whole_batch<DB: TestDb>() {
    let (pool, group, key, q) = fresh::<DB>("rollback").await;
    for reject in [false, true] {
        let mut handler = Counter::new(&group);
        handler.fail_on = Some((format!("{group}-3"), reject));
        let claim = DB::claim(&pool, &q, &key, "me").await.unwrap();
        let mut writer = PartitionWriter::new(writer_config(&pool, handler), key.clone(), claim);
        let batch: Vec<_> = (0..6)
            .map(|o| message(&key.topic, o, &format!("{group}-{o}")))
            .collect();
        let err = writer.write(&batch).await.unwrap_err();
        match (&err, reject) {
            (BatchError::Transient { at: Some(at), .. }, false) => assert_eq!(at.offset, 3),
            (BatchError::Permanent { at, .. }, true) => assert_eq!(at.offset, 3),
            other => panic!("unexpected error {other:?}"),
        }
        assert!(
            effect_counts(&pool, &group).await.is_empty(),
            "partial effects are visible"
        );
        assert_eq!(
            ledger_rows(&pool, &group).await,
            0,
            "ledger rows are visible"
        );
        assert_eq!(writer.position(), None);
        let offsets = DB::offsets(&pool, &q, &group).await.unwrap();
        assert_eq!(offsets[0].next_offset, None, "the offset moved");
    }
}

async fn duplicate_ids_within_one_batch_run_the_handler_once<DB: TestDb>() {
    let (pool, group, key, q) = fresh::<DB>("inbatch").await;
    let claim = DB::claim(&pool, &q, &key, "me").await.unwrap();
    let mut writer = PartitionWriter::new(
        writer_config(&pool, Counter::new(&group)),
        key.clone(),
        claim,
    );
    let ids = ["a", "b", "a", "c", "b", "a"];
    let batch = messages(&key.topic, &group, &ids);
    let outcome = writer.write(&batch).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome::Committed {
            applied: 3,
            duplicates: 3,
            lost: 0,
            next_offset: 6
        }
    );
    let expected: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|i| format!("{group}-{i}"))
        .collect();
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
}

/// A batch that holds the same records more than once, at the same offsets (tansu 0.6.0 sends a
/// stored batch up to three times in one fetch response when the fetch starts before it, and
/// librdkafka passes every copy on): each effect is applied once and the ledger claims each id
/// once, on the fast path and, with a record that is rejected and parked, on the slow path.
async fn records_repeated_at_their_offsets_within_one_batch_run_the_handler_once<DB: TestDb>() {
    for reject in [None, Some(47)] {
        let (pool, group, key, claim) = unit_setup::<DB>("repeated").await;
        let mut handler = Counter::new(&group);
        handler.fail_on = reject.map(|o| (format!("{group}-{o}"), true));
        let mut writer = parking_writer(&pool, handler, Guarantee::EffectivelyOnce, &key, claim);
        let copy: Vec<_> = (45..50)
            .map(|o| message(&key.topic, o, &format!("{group}-{o}")))
            .collect();
        let batch: Vec<_> = copy.iter().chain(&copy).chain(&copy).cloned().collect();
        let outcome = writer.write(&batch).await.unwrap();
        let parked_now = parked(&pool, &group).await.len();
        let applied_ids: Vec<String> = (45..50)
            .filter(|o| Some(*o) != reject)
            .map(|o| format!("{group}-{o}"))
            .collect();
        assert_eq!(
            outcome,
            BatchOutcome::Committed {
                applied: applied_ids.len(),
                duplicates: 15 - applied_ids.len() - writer.parked().len(),
                lost: 0,
                next_offset: 50
            },
            "rejecting {reject:?}"
        );
        assert_eq!(
            parked_now,
            usize::from(reject.is_some()),
            "rejecting {reject:?}"
        );
        assert_exactly_once(&effect_counts(&pool, &group).await, &applied_ids);
        assert_eq!(
            ledger_rows(&pool, &group).await as usize,
            applied_ids.len(),
            "rejecting {reject:?}"
        );
    }
}

async fn event_id_from_the_event_or_the_coordinates<DB: TestDb>() {
    let (pool, group, key, q) = fresh::<DB>("ids").await;
    // Payloads are {"id": …}; offsets 0 and 2 carry the same business id.
    let batch = messages(&key.topic, &group, &["x", "y", "x"]);
    let strategies: [(EventId<Json<serde_json::Value>>, usize); 2] = [
        (
            EventId::from_event(|e: &Json<serde_json::Value>| {
                e["id"].as_str().map(|s| format!("biz:{s}"))
            }),
            2,
        ),
        (EventId::coordinates(), 3),
    ];
    for (i, (strategy, applied)) in strategies.into_iter().enumerate() {
        let group = format!("{group}_{i}");
        let key = PartitionKey {
            group: group.clone(),
            ..key.clone()
        };
        let config = writer_config_with(&pool, Counter::new(&group), strategy);
        let claim = DB::claim(&pool, &q, &key, "me").await.unwrap();
        let mut writer = PartitionWriter::new(config, key.clone(), claim);
        match writer.write(&batch).await.unwrap() {
            BatchOutcome::Committed { applied: a, .. } => assert_eq!(a, applied, "strategy {i}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(ledger_rows(&pool, &group).await, applied as i64);
    }
}

// ---- Permanent failures: parked in the batch's transaction -----------------------------------

/// The unit of work: the rejected record (offset 2 of 6) is parked with its coordinates, key,
/// headers, payload and error; the records before and after it commit in the same transaction;
/// its effect is absent and the ledger does not hold it.
async fn rejected_record_is_parked_and_the_rest_of_its_batch_commits<DB: TestDb>() {
    for guarantee in [
        Guarantee::EffectivelyOnce,
        Guarantee::AtLeastOnce,
        Guarantee::AtMostOnce,
    ] {
        let (pool, group, key, claim) = unit_setup::<DB>("reject").await;
        let mut handler = Counter::new(&group);
        handler.fail_on = Some((format!("{group}-2"), true));
        let mut writer = parking_writer(&pool, handler.clone(), guarantee, &key, claim);
        let batch: Vec<_> = (0..6)
            .map(|o| message(&key.topic, o, &format!("{group}-{o}")))
            .collect();
        let outcome = writer.write(&batch).await.unwrap();
        assert_eq!(
            outcome,
            BatchOutcome::Committed {
                applied: 5,
                duplicates: 0,
                lost: 0,
                next_offset: 6
            },
            "{guarantee}"
        );
        assert_eq!(writer.parked().len(), 1);
        // The fast path ran 0, 1 and 2 (rejected) and rolled back; the slow path ran the five
        // others again, each in a savepoint, and parked 2 without running it again.
        assert_eq!(handler.calls(), 3 + 5, "{guarantee}");

        let letters = parked(&pool, &group).await;
        assert_eq!(letters.len(), 1, "{guarantee}: {letters:?}");
        let l = &letters[0];
        let id = format!("{group}-2");
        assert_eq!(
            (l.topic.as_str(), l.partition, l.offset),
            (key.topic.as_str(), 0, 2)
        );
        assert_eq!(l.group, group);
        assert_eq!(l.key.as_deref(), Some(id.as_bytes()));
        assert_eq!(
            l.headers,
            vec![("event-id".to_owned(), Some(id.as_bytes().to_vec()))]
        );
        assert_eq!(
            l.payload.as_deref(),
            Some(format!(r#"{{"id":"{id}"}}"#).as_bytes())
        );
        assert_eq!(l.timestamp_ms, Some(1_700_000_000_002));
        assert_eq!(l.event_id.as_deref(), Some(id.as_str()));
        assert_eq!(l.kind, FailureKind::Rejected);
        assert!(
            l.error.contains(&format!("test rejects {id}")),
            "{}",
            l.error
        );
        assert_eq!(l.attempts, 1);
        assert!(l.first_failed_at.ends_with('Z'), "{}", l.first_failed_at);
        assert_eq!(
            store(&pool)
                .dead_letters()
                .get(l.id)
                .await
                .unwrap()
                .as_ref(),
            Some(l)
        );

        assert_exactly_once(
            &effect_counts(&pool, &group).await,
            &ids(&group, [0, 1, 3, 4, 5]),
        );
        assert!(!in_ledger(&pool, &group, &id).await);
        let expected_ledger = if guarantee == Guarantee::EffectivelyOnce {
            5
        } else {
            0
        };
        assert_eq!(ledger_rows(&pool, &group).await, expected_ledger);
        assert_eq!(
            stored_offsets(&pool, &group).await[&(key.topic.clone(), 0)],
            6
        );
    }
}

async fn undecodable_and_id_less_records_are_parked_without_running_the_handler<DB: TestDb>() {
    let (pool, group, key, claim) = unit_setup::<DB>("undecodable").await;
    let handler = Counter::new(&group);
    let mut writer = parking_writer(
        &pool,
        handler.clone(),
        Guarantee::EffectivelyOnce,
        &key,
        claim,
    );
    let t = &key.topic;
    let bad_id = format!("{group}-1");
    let batch = vec![
        message(t, 0, &format!("{group}-0")),
        record(
            t,
            1,
            None,
            &[("event-id", Some(bad_id.as_bytes()))],
            Some(b"{not json"),
        ),
        message(t, 2, &format!("{group}-2")),
        record(t, 3, Some(b"k"), &[], Some(br#"{"id":"x"}"#)),
        message(t, 4, &format!("{group}-4")),
    ];
    let outcome = writer.write(&batch).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome::Committed {
            applied: 3,
            duplicates: 0,
            lost: 0,
            next_offset: 5
        }
    );
    assert_eq!(
        handler.calls(),
        3,
        "the handler ran for a record it cannot handle"
    );
    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let (undecodable, no_id) = (&letters[0], &letters[1]);
    assert_eq!(undecodable.offset, 1);
    assert_eq!(undecodable.kind, FailureKind::Undecodable);
    assert_eq!(undecodable.event_id.as_deref(), Some(bad_id.as_str()));
    assert_eq!(
        undecodable.payload.as_deref(),
        Some(b"{not json".as_slice())
    );
    assert_eq!(undecodable.attempts, 0);
    assert_eq!(no_id.offset, 3);
    assert_eq!(no_id.kind, FailureKind::MissingEventId);
    assert_eq!(no_id.event_id, None);
    assert!(no_id.error.contains("event-id"), "{}", no_id.error);
    assert_eq!(no_id.key.as_deref(), Some(b"k".as_slice()));
    assert!(no_id.headers.is_empty());
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids(&group, [0, 2, 4]));
    assert_eq!(ledger_rows(&pool, &group).await, 3);
}

async fn redrive_applies_the_effect_exactly_once_even_concurrently<DB: TestDb>() {
    let (pool, group, key, claim) = unit_setup::<DB>("redrive").await;
    let bad = format!("{group}-1");
    let mut rejecting = Counter::new(&group);
    rejecting.fail_on = Some((bad.clone(), true));
    let mut writer = parking_writer(
        &pool,
        rejecting.clone(),
        Guarantee::EffectivelyOnce,
        &key,
        claim,
    );
    let batch: Vec<_> = (0..3)
        .map(|o| message(&key.topic, o, &format!("{group}-{o}")))
        .collect();
    writer.write(&batch).await.unwrap();
    let id = parked(&pool, &group).await[0].id;

    // The handler still rejects it: nothing applied, the dead letter stays with one more attempt.
    let strategy = EventId::default();
    let again = store(&pool)
        .dead_letters()
        .redrive(&rejecting, &strategy, id)
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
    let letter = store(&pool).dead_letters().get(id).await.unwrap().unwrap();
    assert_eq!(letter.attempts, 2);
    assert!(!effect_counts(&pool, &group).await.contains_key(&bad));

    // Fixed: two concurrent redrives apply it once.
    let fixed = Counter::new(&group);
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let (pool, fixed) = (pool.clone(), fixed.clone());
            tokio::spawn(async move {
                store(&pool)
                    .dead_letters()
                    .redrive(&fixed, &EventId::default(), id)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let applied = outcomes
        .iter()
        .filter(|o| matches!(o, Redriven::Applied { event_id } if *event_id == bad))
        .count();
    assert_eq!(applied, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Redriven::Applied { .. } | Redriven::NotFound)),
        "{outcomes:?}"
    );
    // And a third time, later.
    let third = store(&pool)
        .dead_letters()
        .redrive(&fixed, &strategy, id)
        .await
        .unwrap();
    assert_eq!(third, Redriven::NotFound);

    assert_eq!(store(&pool).dead_letters().get(id).await.unwrap(), None);
    assert!(parked(&pool, &group).await.is_empty());
    assert!(in_ledger(&pool, &group, &bad).await);
    assert_eq!(fixed.applied(), 1);
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids(&group, 0..3));
}

/// A parked record whose event id the ledger holds by now (say a replay applied a producer
/// duplicate of it) is not applied again by a redrive: its dead letter is just removed.
async fn redrive_of_an_event_already_applied_is_a_no_op<DB: TestDb>() {
    let (pool, group, key, claim) = unit_setup::<DB>("redrive-dup").await;
    let bad = format!("{group}-0");
    let mut rejecting = Counter::new(&group);
    rejecting.fail_on = Some((bad.clone(), true));
    let mut writer = parking_writer(&pool, rejecting, Guarantee::EffectivelyOnce, &key, claim);
    writer.write(&[message(&key.topic, 0, &bad)]).await.unwrap();
    // The same event again at offset 1, now applied by a handler that accepts it.
    let q = queries::<DB>();
    let claim = DB::claim(&pool, &q, &key, "me").await.unwrap();
    let fixed = Counter::new(&group);
    let mut writer = parking_writer(
        &pool,
        fixed.clone(),
        Guarantee::EffectivelyOnce,
        &key,
        claim,
    );
    writer.write(&[message(&key.topic, 1, &bad)]).await.unwrap();
    let id = parked(&pool, &group).await[0].id;
    let outcome = store(&pool)
        .dead_letters()
        .redrive(&fixed, &EventId::default(), id)
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Redriven::AlreadyApplied {
            event_id: bad.clone()
        }
    );
    assert_eq!(fixed.applied(), 1);
    assert!(parked(&pool, &group).await.is_empty());
    assert_exactly_once(&effect_counts(&pool, &group).await, &[bad]);
}

async fn purge_and_delete_remove_dead_letters<DB: TestDb>() {
    let (pool, group, key, claim) = unit_setup::<DB>("purge").await;
    let mut writer = parking_writer(
        &pool,
        Counter::new(&group),
        Guarantee::EffectivelyOnce,
        &key,
        claim,
    );
    // Three records without an event id.
    let batch: Vec<_> = (0..3)
        .map(|o| record(&key.topic, o, None, &[], Some(b"{}")))
        .collect();
    writer.write(&batch).await.unwrap();
    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 3);
    assert!(
        store(&pool)
            .dead_letters()
            .delete(letters[0].id)
            .await
            .unwrap()
    );
    assert!(
        !store(&pool)
            .dead_letters()
            .delete(letters[0].id)
            .await
            .unwrap()
    );
    assert_eq!(
        store(&pool)
            .dead_letters()
            .list(&group, Some("no-such-topic"))
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(
        store(&pool)
            .dead_letters()
            .purge(&group, Some(&key.topic))
            .await
            .unwrap(),
        2
    );
    assert!(parked(&pool, &group).await.is_empty());
}

// ---- (f) headers that are not UTF-8 ----------------------------------------------------------

async fn invalid_utf8_headers_round_trip_into_the_dead_letter<DB: TestDb>() {
    let (pool, group, key, claim) = unit_setup::<DB>("headers").await;
    let id = format!("{group}-0");
    let mut rejecting = Counter::new(&group);
    rejecting.fail_on = Some((id.clone(), true));
    let mut writer = parking_writer(&pool, rejecting, Guarantee::EffectivelyOnce, &key, claim);
    let binary: &[u8] = &[0xff, 0xfe, 0x00, 0x80, b'"', b'\\'];
    let headers: Vec<(&str, Option<&[u8]>)> = vec![
        ("event-id", Some(id.as_bytes())),
        ("trace", Some(binary)),
        ("empty", Some(b"")),
        ("none", None),
        ("trace", Some("ünïcødé".as_bytes())),
    ];
    let key_bytes: &[u8] = &[0xc3, 0x28];
    let payload = format!(r#"{{"id":"{id}"}}"#);
    let m = record(
        &key.topic,
        0,
        Some(key_bytes),
        &headers,
        Some(payload.as_bytes()),
    );
    writer.write(std::slice::from_ref(&m)).await.unwrap();
    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 1);
    let expected: Vec<(String, Option<Vec<u8>>)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(letters[0].headers, expected);
    assert_eq!(letters[0].key.as_deref(), Some(key_bytes));
    // The rebuilt record carries the same headers, as a redrive's handler sees them.
    let rebuilt = letters[0].to_message();
    use rdkafka::Message as _;
    use rdkafka::message::Headers as _;
    let again: Vec<(String, Option<Vec<u8>>)> = rebuilt
        .headers()
        .unwrap()
        .iter()
        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(again, expected);
}

// ---- The slow path's corner cases ------------------------------------------------------------

/// Several failures in one batch, and a later record with the id of a parked one: it gets its
/// own chance (here it is rejected as well, and parked too); nothing of either is claimed.
async fn several_failures_and_a_duplicate_of_a_parked_record_in_one_batch<DB: TestDb>() {
    let (pool, group, key, claim) = unit_setup::<DB>("several").await;
    let bad = format!("{group}-b");
    let mut handler = Counter::new(&group);
    handler.fail_on = Some((bad.clone(), true));
    handler.panic_on = Some(format!("{group}-p"));
    let mut writer = parking_writer(
        &pool,
        handler.clone(),
        Guarantee::EffectivelyOnce,
        &key,
        claim,
    );
    let names = ["a", "b", "c", "p", "b", "d", "a"];
    let batch = messages(&key.topic, &group, &names);
    let outcome = writer.write(&batch).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome::Committed {
            applied: 3,
            duplicates: 1,
            lost: 0,
            next_offset: 7
        }
    );
    let letters = parked(&pool, &group).await;
    let got: Vec<(i64, FailureKind)> = letters.iter().map(|l| (l.offset, l.kind)).collect();
    assert_eq!(
        got,
        vec![
            (1, FailureKind::Rejected),
            (3, FailureKind::Panicked),
            (4, FailureKind::Rejected)
        ]
    );
    assert_exactly_once(
        &effect_counts(&pool, &group).await,
        &[
            format!("{group}-a"),
            format!("{group}-c"),
            format!("{group}-d"),
        ],
    );
    assert_eq!(ledger_rows(&pool, &group).await, 3);
    assert!(!in_ledger(&pool, &group, &bad).await);
}

/// A writer that does not park (the default of `PartitionWriter::new`) still rolls the whole
/// batch back on a permanent failure and writes no dead letter.
async fn a_writer_that_does_not_park_rolls_back_and_parks_nothing<DB: TestDb>() {
    let (pool, group, key, claim) = unit_setup::<DB>("strict").await;
    let mut handler = Counter::new(&group);
    handler.panic_on = Some(format!("{group}-1"));
    let mut writer = PartitionWriter::new(
        config(&pool, handler, Guarantee::EffectivelyOnce),
        key.clone(),
        claim,
    );
    let batch: Vec<_> = (0..3)
        .map(|o| message(&key.topic, o, &format!("{group}-{o}")))
        .collect();
    let err = writer.write(&batch).await.unwrap_err();
    assert!(
        matches!(&err, BatchError::Permanent { at, kind: FailureKind::Panicked, .. } if at.offset == 1),
        "{err}"
    );
    assert!(parked(&pool, &group).await.is_empty());
    assert!(effect_counts(&pool, &group).await.is_empty());
    assert_eq!(ledger_rows(&pool, &group).await, 0);
}

suite!(
    stale_epoch_cannot_commit_and_leaves_nothing_visible,
    handler_error_rolls_back_the_whole_batch,
    duplicate_ids_within_one_batch_run_the_handler_once,
    records_repeated_at_their_offsets_within_one_batch_run_the_handler_once,
    event_id_from_the_event_or_the_coordinates,
    rejected_record_is_parked_and_the_rest_of_its_batch_commits,
    undecodable_and_id_less_records_are_parked_without_running_the_handler,
    redrive_applies_the_effect_exactly_once_even_concurrently,
    redrive_of_an_event_already_applied_is_a_no_op,
    purge_and_delete_remove_dead_letters,
    invalid_utf8_headers_round_trip_into_the_dead_letter,
    several_failures_and_a_duplicate_of_a_parked_record_in_one_batch,
    a_writer_that_does_not_park_rolls_back_and_parks_nothing,
);
