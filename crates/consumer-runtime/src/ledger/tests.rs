//! Ledger retention on both databases, without Kafka: claims racing the switch to a new
//! generation and the drop of old ones, a duplicate arriving generations later, pruning by
//! retention, the floor it leaves and the checks that use it, and the upgrade in place of a
//! populated ledger of the old layout. Every test has a schema (PostgreSQL) or file (SQLite) of
//! its own, because generations belong to a whole schema; the effect is the non-idempotent
//! counter of the test support.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use sqlx::Pool;

use crate::config::Guarantee;
use crate::error::Error;
use crate::event_id::EventId;
use crate::store::{Backend, Claim, PartitionKey, Queries, Store};
use crate::test_support::*;
use crate::unit::{BatchOutcome, PartitionWriter, WriterConfig};

/// A record of `partition` at `offset` whose `event-id` header is `id`.
fn message(topic: &str, partition: i32, offset: i64, id: &str) -> OwnedMessage {
    let payload = format!(r#"{{"id":"{id}"}}"#);
    OwnedMessage::new(
        Some(payload.into_bytes()),
        Some(id.as_bytes().to_vec()),
        topic.to_owned(),
        Timestamp::CreateTime(1_700_000_000_000 + offset),
        partition,
        offset,
        Some(OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(id.as_bytes()),
        })),
    )
}

/// A pool, a schema of the test's own (migrated), its store and SQL, and a fresh group.
async fn own_schema<DB: TestDb>() -> (Pool<DB>, Store<DB>, Queries, String) {
    let pool = DB::pool().await;
    let schema = rand_name("ledger");
    crate::migrate(&pool, &schema).await.expect("migrate");
    let store = Store::new(pool.clone(), &schema).unwrap();
    let q = Queries::new::<DB>(&schema).unwrap();
    (pool, store, q, rand_name("g"))
}

fn writer_config<DB: TestDb>(
    pool: &Pool<DB>,
    q: &Queries,
    handler: Counter,
) -> Arc<WriterConfig<Counter, DB>> {
    Arc::new(WriterConfig {
        handler: Arc::new(handler),
        pool: pool.clone(),
        queries: q.clone(),
        guarantee: Guarantee::EffectivelyOnce,
        event_id: EventId::default(),
    })
}

async fn writer<DB: TestDb>(
    config: &Arc<WriterConfig<Counter, DB>>,
    q: &Queries,
    group: &str,
    topic: &str,
    partition: i32,
) -> PartitionWriter<Counter, DB> {
    let key = PartitionKey {
        group: group.to_owned(),
        topic: topic.to_owned(),
        partition,
    };
    let claim: Claim = DB::claim(&config.pool, q, &key, "me").await.unwrap();
    PartitionWriter::new(config.clone(), key, claim)
}

async fn newest<DB: Backend>(store: &Store<DB>) -> i32 {
    store
        .ledger_generations()
        .await
        .unwrap()
        .last()
        .unwrap()
        .generation
}

/// Writes `ids` as the next records of `w`'s partition, starting at `*offset`; returns how many
/// were applied.
async fn write_ids<DB: TestDb>(
    w: &mut PartitionWriter<Counter, DB>,
    topic: &str,
    offset: &mut i64,
    ids: &[String],
) -> usize {
    let partition = w.key().partition;
    let batch: Vec<_> = ids
        .iter()
        .map(|id| {
            let m = message(topic, partition, *offset, id);
            *offset += 1;
            m
        })
        .collect();
    match w.write(&batch).await.unwrap() {
        BatchOutcome::Committed { applied, .. } => applied,
        other => panic!("the batch did not commit: {other:?}"),
    }
}

// ---- Item 2: duplicates across generation boundaries -----------------------------------------

/// Four partitions receive the same events at the same time (a producer that wrote each event
/// to every partition), round after round, while another task switches generations as fast as
/// it can and drops every generation whose rounds are over. Every event is applied exactly once.
async fn claims_racing_generation_switches_and_drops_apply_each_event_once<DB: TestDb>() {
    const PARTITIONS: i32 = 4;
    const ROUNDS: i64 = 25;
    const PER_ROUND: usize = 20;
    let (pool, store, q, group) = own_schema::<DB>().await;
    let topic = rand_name("race");
    let config = writer_config(&pool, &q, Counter::new(&group));
    let done = Arc::new(AtomicBool::new(false));
    // The round the writers are in; rounds below it are over (every copy of their events
    // claimed and committed).
    let round = Arc::new(AtomicI64::new(0));

    let pruner = tokio::spawn({
        let (store, q, done, round) = (store.clone(), q.clone(), done.clone(), round.clone());
        async move {
            // For each generation started: the round in progress when it started, i.e. the
            // last round whose events the generation before it may hold.
            let mut ended_in: Vec<(i32, i64)> = Vec::new();
            let (mut switches, mut drops) = (0u32, 0u32);
            while !done.load(Ordering::SeqCst) {
                let current = newest(&store).await;
                if DB::start_generation(store.pool(), &q, current)
                    .await
                    .unwrap()
                {
                    switches += 1;
                    // Read after the switch: every claim of `current` committed before it.
                    ended_in.push((current, round.load(Ordering::SeqCst)));
                }
                let over = round.load(Ordering::SeqCst);
                while let Some(&(g, last_round)) = ended_in.first() {
                    if last_round >= over {
                        break;
                    }
                    if DB::drop_generation(store.pool(), &q, g)
                        .await
                        .unwrap()
                        .is_some()
                    {
                        drops += 1;
                    }
                    ended_in.remove(0);
                }
                tokio::task::yield_now().await;
            }
            (switches, drops)
        }
    });

    let mut writers = Vec::new();
    for p in 0..PARTITIONS {
        writers.push(writer(&config, &q, &group, &topic, p).await);
    }
    let mut offsets = vec![0i64; PARTITIONS as usize];
    let mut expected = Vec::new();
    for r in 0..ROUNDS {
        let ids: Vec<String> = (0..PER_ROUND).map(|i| format!("{group}-{r}-{i}")).collect();
        expected.extend(ids.iter().cloned());
        let mut tasks = Vec::new();
        for (mut w, mut offset) in writers.drain(..).zip(offsets.iter().copied()) {
            let (ids, topic) = (ids.clone(), topic.clone());
            tasks.push(tokio::spawn(async move {
                let applied = write_ids(&mut w, &topic, &mut offset, &ids).await;
                (w, offset, applied)
            }));
        }
        let mut applied = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let (w, offset, a) = t.await.unwrap();
            writers.push(w);
            offsets[i] = offset;
            applied += a;
        }
        assert_eq!(
            applied, PER_ROUND,
            "round {r}: applied {applied} of {PER_ROUND}"
        );
        round.store(r + 1, Ordering::SeqCst);
    }
    done.store(true, Ordering::SeqCst);
    let (switches, drops) = pruner.await.unwrap();
    assert!(
        switches >= 2,
        "the test must race claims against switches; only {switches} happened"
    );
    let counts = DB::effect_counts(&pool, &group).await;
    assert_exactly_once(&counts, &expected);
    eprintln!("{switches} generation switches, {drops} generations dropped during the race");
}

/// An event claimed in one generation and sent again (as a new record, on another partition)
/// after two switches is still a duplicate: it runs nowhere a second time.
async fn a_duplicate_arriving_generations_later_is_caught<DB: TestDb>() {
    let (pool, store, q, group) = own_schema::<DB>().await;
    let topic = rand_name("late");
    let config = writer_config(&pool, &q, Counter::new(&group));
    let ids: Vec<String> = (0..10).map(|i| format!("{group}-{i}")).collect();
    let mut first = writer(&config, &q, &group, &topic, 0).await;
    let mut offset = 0;
    assert_eq!(write_ids(&mut first, &topic, &mut offset, &ids).await, 10);
    for _ in 0..2 {
        let g = newest(&store).await;
        assert!(DB::start_generation(&pool, &q, g).await.unwrap());
    }
    let mut late = writer(&config, &q, &group, &topic, 1).await;
    let mut offset = 0;
    assert_eq!(
        write_ids(&mut late, &topic, &mut offset, &ids).await,
        0,
        "a duplicate two generations later was applied again"
    );
    assert_exactly_once(&DB::effect_counts(&pool, &group).await, &ids);
    assert_eq!(store.ledger_rows(&group).await.unwrap(), 10);
}

// ---- Item 1 and 3: retention, the floor and its checks ---------------------------------------

/// Pruning with a short retention drops old generations and keeps the newest; dropping
/// raises the floor to the offset the partition had reached; moving below the floor is refused
/// with the number of records, and forced it goes through.
async fn pruning_drops_old_generations_and_raises_the_floor<DB: TestDb>() {
    let (pool, store, q, group) = own_schema::<DB>().await;
    let topic = rand_name("prune");
    let config = writer_config(&pool, &q, Counter::new(&group));
    let mut w = writer(&config, &q, &group, &topic, 0).await;
    let mut offset = 0;
    let old: Vec<String> = (0..50).map(|i| format!("{group}-old-{i}")).collect();
    assert_eq!(write_ids(&mut w, &topic, &mut offset, &old).await, 50);

    let retention = Duration::from_millis(400);
    // The first run switches generations (the newest is older than a quarter of the
    // retention); the old one is dropped once its successor is older than the retention.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut report = store.prune_ledger(retention).await.unwrap();
    while report.dropped.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing pruned: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        report = store.prune_ledger(retention).await.unwrap();
    }
    assert_eq!(report.rows_dropped, 50, "{report:?}");
    assert_eq!(store.ledger_rows(&group).await.unwrap(), 0);
    let row = store.stored_offsets(&group).await.unwrap().remove(0);
    assert_eq!(
        row.ledger_floor,
        Some(50),
        "the floor is where the partition was"
    );

    // New events after the prune are remembered.
    let new: Vec<String> = (0..5).map(|i| format!("{group}-new-{i}")).collect();
    assert_eq!(write_ids(&mut w, &topic, &mut offset, &new).await, 5);
    assert_eq!(store.ledger_rows(&group).await.unwrap(), 5);

    // Below the floor: refused, with the count; at the floor: fine; forced: fine.
    let err = store
        .set_offsets(&group, &topic, &[(0, 20)])
        .await
        .unwrap_err();
    match &err {
        Error::BelowLedgerFloor {
            floor: 50,
            records: 30,
            offset: 20,
            ..
        } => {}
        other => panic!("expected a floor refusal, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("30 records") && text.contains("--below-floor"),
        "{text}"
    );
    assert_eq!(
        store.stored_offsets(&group).await.unwrap()[0].next_offset,
        Some(55),
        "a refused move changed the offset"
    );
    store.set_offsets(&group, &topic, &[(0, 50)]).await.unwrap();
    store
        .set_offsets_below_floor(&group, &topic, &[(0, 20)])
        .await
        .unwrap();
    assert_eq!(
        store.stored_offsets(&group).await.unwrap()[0].next_offset,
        Some(20)
    );
}

/// A replay that moved the offset back holds the generation until the partition passed its rows
/// again, and does not lower the mark: the floor is the highest offset the partition ever
/// reached before the generation ended.
async fn a_generation_waits_for_a_replay_and_the_floor_is_the_highest_offset_reached<DB: TestDb>() {
    let (pool, store, q, group) = own_schema::<DB>().await;
    let topic = rand_name("high");
    let config = writer_config(&pool, &q, Counter::new(&group));
    let mut w = writer(&config, &q, &group, &topic, 0).await;
    let mut offset = 0;
    let ids: Vec<String> = (0..30).map(|i| format!("{group}-{i}")).collect();
    assert_eq!(write_ids(&mut w, &topic, &mut offset, &ids).await, 30);
    // An operator moves the partition back before the generation ends: the generation is
    // held (dropping it would make the partition re-apply 10..30) until the partition has
    // passed its rows again.
    store.set_offsets(&group, &topic, &[(0, 10)]).await.unwrap();
    let g = newest(&store).await;
    assert!(DB::start_generation(&pool, &q, g).await.unwrap());
    assert_eq!(
        DB::drop_generation(&pool, &q, g).await.unwrap(),
        None,
        "not held"
    );
    assert_eq!(store.ledger_rows(&group).await.unwrap(), 30);
    assert_eq!(
        store.stored_offsets(&group).await.unwrap()[0].ledger_floor,
        None
    );
    store.set_offsets(&group, &topic, &[(0, 30)]).await.unwrap();
    assert_eq!(DB::drop_generation(&pool, &q, g).await.unwrap(), Some(30));
    let row = store.stored_offsets(&group).await.unwrap().remove(0);
    assert_eq!(row.ledger_floor, Some(30));
}

// ---- Item 4: the upgrade in place --------------------------------------------------------------

/// Plain SQL (values inlined) and a migrator run, on either database.
#[async_trait::async_trait]
trait Raw: TestDb {
    async fn exec(pool: &Pool<Self>, sql: String);
    async fn run(migrator: &sqlx::migrate::Migrator, pool: &Pool<Self>);
}

macro_rules! impl_raw {
    ($db:ty) => {
        #[async_trait::async_trait]
        impl Raw for $db {
            async fn exec(pool: &Pool<Self>, sql: String) {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(pool)
                    .await
                    .unwrap();
            }
            async fn run(migrator: &sqlx::migrate::Migrator, pool: &Pool<Self>) {
                migrator.run(pool).await.unwrap();
            }
        }
    };
}
impl_raw!(sqlx::Postgres);
impl_raw!(sqlx::Sqlite);

/// A ledger of the layout before generations, populated (two groups, one event in both, a row
/// whose partition has no offsets row), upgrades with nothing lost: every event is still a
/// duplicate for its group and only for its group, and new events are claimed. The number of
/// rows comes from `LEDGER_UPGRADE_ROWS` (default 3,000), so that the upgrade of a large ledger
/// can be timed by hand: `LEDGER_UPGRADE_ROWS=1000000 cargo test -p consumer-runtime --lib
/// upgrade -- --nocapture`.
async fn a_populated_ledger_of_the_old_layout_upgrades_in_place<DB: Raw>() {
    let rows: i64 = std::env::var("LEDGER_UPGRADE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let pool = DB::pool().await;
    let schema = rand_name("upgrade");
    let q = Queries::new::<DB>(&schema).unwrap();
    // The migrations before this one.
    let full = DB::migrator(&q);
    let old: Vec<_> = full
        .iter()
        .filter(|m| m.version < 20261201000200)
        .cloned()
        .collect();
    let mut before = sqlx::migrate::Migrator::with_migrations(old);
    let table = match DB::KIND {
        crate::store::DatabaseKind::Postgres => {
            before.create_schema(schema.clone());
            format!("{schema}._migrations")
        }
        _ => format!("{schema}__migrations"),
    };
    before.dangerous_set_table_name(table);
    DB::run(&before, &pool).await;

    let (a, b) = (rand_name("ga"), rand_name("gb"));
    let topic = rand_name("up");
    let t = |name: &str| match DB::KIND {
        crate::store::DatabaseKind::Postgres => format!("{schema}.{name}"),
        _ => format!("{schema}_{name}"),
    };
    let offsets = t("consumer_offsets");
    let processed = t("processed");
    for (group, next) in [(&a, rows), (&b, 1)] {
        DB::exec(&pool, format!(
            "INSERT INTO {offsets} (consumer_group, topic, partition, next_offset, epoch) VALUES ('{group}', '{topic}', 0, {next}, 3)"
        ))
        .await;
    }
    // Group a: `rows` events on partition 0, generated by the database.
    let series = match DB::KIND {
        crate::store::DatabaseKind::Postgres => format!(
            "INSERT INTO {processed} (consumer_group, event_id, topic, partition, \"offset\") \
             SELECT '{a}', '{a}-' || i, '{topic}', 0, i FROM generate_series(0, {rows} - 1) AS i"
        ),
        _ => format!(
            "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < {rows}) \
             INSERT INTO {processed} (consumer_group, event_id, topic, partition, \"offset\") \
             SELECT '{a}', '{a}-' || i, '{topic}', 0, i FROM s"
        ),
    };
    let started = std::time::Instant::now();
    DB::exec(&pool, series).await;
    eprintln!(
        "populated {rows} old-layout ledger rows in {:?}",
        started.elapsed()
    );
    // Group b saw event a-0 too; and a row on partition 7, which has no offsets row.
    DB::exec(&pool, format!(
        "INSERT INTO {processed} (consumer_group, event_id, topic, partition, \"offset\") VALUES \
         ('{b}', '{a}-0', '{topic}', 0, 0), ('{b}', '{b}-x', '{topic}', 7, 0)"
    ))
    .await;

    let started = std::time::Instant::now();
    crate::migrate(&pool, &schema).await.expect("the upgrade");
    eprintln!(
        "{}: upgraded a ledger of {} rows in {:?}",
        DB::KIND,
        rows + 2,
        started.elapsed()
    );

    let store = Store::new(pool.clone(), &schema).unwrap();
    assert_eq!(store.ledger_rows(&a).await.unwrap(), rows);
    assert_eq!(store.ledger_rows(&b).await.unwrap(), 2);
    let stored = store.stored_offsets(&a).await.unwrap();
    assert_eq!(stored[0].next_offset, Some(rows));
    assert_eq!(stored[0].epoch, 3);
    assert_eq!(stored[0].ledger_floor, None);

    // Replaying group a from its start applies nothing; a new event is applied once.
    let config = writer_config(&pool, &q, Counter::new(&a));
    let mut w = writer(&config, &q, &a, &topic, 1).await;
    let mut offset = 0;
    let sample: Vec<String> = (0..rows.min(500)).map(|i| format!("{a}-{i}")).collect();
    assert_eq!(
        write_ids(&mut w, &topic, &mut offset, &sample).await,
        0,
        "an upgraded ledger let a duplicate through"
    );
    let fresh = vec![format!("{a}-new")];
    assert_eq!(write_ids(&mut w, &topic, &mut offset, &fresh).await, 1);
    // Group b: a-0 and b-x are duplicates, a-1 is not (dedup stays per group).
    let config = writer_config(&pool, &q, Counter::new(&b));
    let mut w = writer(&config, &q, &b, &topic, 0).await;
    let mut offset = 1;
    let mixed = vec![format!("{a}-0"), format!("{b}-x"), format!("{a}-1")];
    assert_eq!(write_ids(&mut w, &topic, &mut offset, &mixed).await, 1);
    assert_exactly_once(&DB::effect_counts(&pool, &b).await, &[format!("{a}-1")]);
}

suite!(
    claims_racing_generation_switches_and_drops_apply_each_event_once,
    a_duplicate_arriving_generations_later_is_caught,
    pruning_drops_old_generations_and_raises_the_floor,
    a_generation_waits_for_a_replay_and_the_floor_is_the_highest_offset_reached,
    a_populated_ledger_of_the_old_layout_upgrades_in_place,
);
