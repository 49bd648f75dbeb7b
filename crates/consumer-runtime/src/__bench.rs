//! The unit of work without Kafka, for the benchmark's `sql_only_limit` scenario only.
//!
//! Not part of the API: compiled only with the `bench-internals` feature (which only the
//! bench crate enables), hidden from the documentation, and free to change with the crate's
//! internals. It exposes exactly what the scenario drives: a fenced writer of one partition
//! (claimed like the runtime claims a partition on assignment) and how many transactions the
//! runtime allows at once.

use std::sync::Arc;

use rdkafka::message::OwnedMessage;
use sqlx::Pool;

use crate::config::Guarantee;
use crate::error::{BoxError, Error, Result};
use crate::event_id::EventId;
use crate::handler::Handler;
use crate::store::{Backend, CRATE, PartitionKey, Store};
use crate::unit::{BatchOutcome, PartitionWriter, WriterConfig};

/// The runtime's writer of one partition under effectively-once, with the default event ids
/// (the `event-id` header) and no parking.
pub struct Writer<H: Handler<DB>, DB: Backend>(PartitionWriter<H, DB>);

impl<H: Handler<DB>, DB: Backend> Writer<H, DB> {
    /// Claims `topic`/`partition` for `group` as `owner` (a new epoch) and returns its writer.
    pub async fn claim(
        store: &Store<DB>,
        handler: Arc<H>,
        group: &str,
        topic: &str,
        partition: i32,
        owner: &str,
    ) -> Result<Self> {
        let config = Arc::new(WriterConfig {
            handler,
            pool: store.pool().clone(),
            queries: store.queries().clone(),
            guarantee: Guarantee::EffectivelyOnce,
            event_id: EventId::default(),
        });
        let key = PartitionKey {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
        };
        let claim = DB::claim(store.pool(), store.queries(), &key, owner)
            .await
            .map_err(Error::db("claiming a partition"))?;
        Ok(Writer(PartitionWriter::new(config, key, claim)))
    }

    /// Runs the unit of work for one batch of the partition's records, in offset order, and
    /// returns how many records were applied. A batch that did not commit (fenced, empty, or
    /// failed) is an error.
    pub async fn write(&mut self, batch: &[OwnedMessage]) -> std::result::Result<usize, BoxError> {
        match self.0.write(batch).await? {
            BatchOutcome::Committed { applied, .. } => Ok(applied),
            other => Err(format!("the batch did not commit: {other:?}").into()),
        }
    }
}

/// How many of the runtime's transactions may be open at once on `pool` (SQLite: one).
pub fn max_writers<DB: Backend>(pool: &Pool<DB>) -> usize {
    DB::max_writers(pool, CRATE)
}

/// The runtime's own statements of the batch unit of work on `store`, for the benchmark's
/// `server_limit` (which runs them with pgbench): the fence (`$1` group, `$2` topic, `$3`
/// partition, `$4` epoch, `$5` the expected stored offset, `$6` the new one) and the ledger
/// claim (`$1` group, `$2` topic, `$3` partition, `$4` the ids as `text[]`, `$5` their offsets
/// as `bigint[]`).
pub fn unit_statements<DB: Backend>(store: &Store<DB>) -> (String, String) {
    let q = store.queries();
    (
        q.advance.as_str().to_owned(),
        q.claim_events.as_str().to_owned(),
    )
}
