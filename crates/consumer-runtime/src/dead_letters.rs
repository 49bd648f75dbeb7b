//! Dead letters: records that failed permanently, parked in `dead_letters` by the runtime in
//! the same transaction that advanced their partition's offset, while the rest of their batch
//! committed.
//!
//! [`DeadLetters`] (from [`Store::dead_letters`]) is the library behind a consumer program's
//! `dead-letters` command: [`list`](DeadLetters::list), [`get`](DeadLetters::get),
//! [`purge`](DeadLetters::purge), [`delete`](DeadLetters::delete) and
//! [`redrive`](DeadLetters::redrive), which runs the current handler for a parked record
//! exactly once, through the same per-record step as consumption (decode and identify, claim
//! the event id, run the handler under its time limit, classify its failure).
//!
//! The stored row ([`DeadLetter`]) and the format of its `headers` column are the store's
//! (`store/dead_letter.rs`).

use crate::error::{Error, FailureKind, Result, error_chain};
use crate::event_id::EventId;
use crate::handler::Handler;
use crate::store::{Backend, CRATE, PartitionKey, Store};
use crate::unit::{RecordFailure, claim_one, handle_record, identify};

pub use crate::store::dead_letter::{DeadLetter, HeaderList};

/// What [`DeadLetters::redrive`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Redriven {
    /// The handler ran and committed; the event id is claimed in the ledger and the dead
    /// letter is gone, all in one transaction.
    Applied {
        /// The event id claimed.
        event_id: String,
    },
    /// The ledger already held the event id (a replay or another redrive applied it): the
    /// handler did not run, and the dead letter was deleted.
    AlreadyApplied {
        /// The event id.
        event_id: String,
    },
    /// No dead letter has this id (already redriven, or purged). Nothing changed.
    NotFound,
    /// The record failed permanently again (rejected, panicked, still undecodable or without
    /// an event id): nothing was applied, the dead letter stays, with this error, one more
    /// attempt and a new `last_failed_at`.
    Failed {
        /// What kind of failure.
        kind: FailureKind,
        /// The error.
        error: String,
    },
    /// The handler asked for a retry: nothing changed; redrive it again later.
    Retry {
        /// The error.
        error: String,
    },
}

impl<DB: Backend> Store<DB> {
    /// The dead letters of this store: list, show, redrive, delete, purge.
    pub fn dead_letters(&self) -> DeadLetters<'_, DB> {
        DeadLetters { store: self }
    }
}

/// The dead letters of a [`Store`], from [`Store::dead_letters`].
#[derive(Debug, Clone, Copy)]
pub struct DeadLetters<'s, DB: Backend> {
    store: &'s Store<DB>,
}

impl<DB: Backend> DeadLetters<'_, DB> {
    /// A group's dead letters, of one topic or all, ordered by topic, partition and offset.
    pub async fn list(&self, group: &str, topic: Option<&str>) -> Result<Vec<DeadLetter>> {
        DB::dead_letters(self.store.pool(), self.store.queries(), group, topic)
            .await
            .map_err(Error::db("reading dead letters"))
    }

    /// One dead letter by id.
    pub async fn get(&self, id: i64) -> Result<Option<DeadLetter>> {
        DB::dead_letter(self.store.pool(), self.store.queries(), id)
            .await
            .map_err(Error::db("reading a dead letter"))
    }

    /// Deletes a group's dead letters, of one topic or all, without applying them; returns
    /// how many. Their records are then neither applied nor parked anywhere: only for records
    /// you have decided to drop.
    pub async fn purge(&self, group: &str, topic: Option<&str>) -> Result<u64> {
        DB::purge_dead_letters(self.store.pool(), self.store.queries(), group, topic)
            .await
            .map_err(Error::db("purging dead letters"))
    }

    /// Deletes one dead letter without applying it; `false` if there was none.
    pub async fn delete(&self, id: i64) -> Result<bool> {
        DB::delete_dead_letter(self.store.pool(), self.store.queries(), id)
            .await
            .map_err(Error::db("deleting a dead letter"))
    }

    /// Runs `handler` for the parked record `id`, exactly once.
    ///
    /// One transaction deletes the dead letter (`DELETE … RETURNING`, which also locks it
    /// against a concurrent redrive), works out the event id under `strategy` (as the consumer
    /// would), claims it in the group's ledger and runs the handler. It commits only if the
    /// handler succeeds, so the effect, the ledger row and the removal of the dead letter
    /// happen together. A second redrive, concurrent or later, finds no row
    /// ([`Redriven::NotFound`]); a record whose event id the ledger already holds is not
    /// applied again ([`Redriven::AlreadyApplied`]). A handler that rejects or panics leaves
    /// the dead letter in place with the new error ([`Redriven::Failed`]); one that asks for a
    /// retry changes nothing ([`Redriven::Retry`]). Errors are the database's.
    pub async fn redrive<H: Handler<DB>>(
        &self,
        handler: &H,
        strategy: &EventId<H::Event>,
        id: i64,
    ) -> Result<Redriven> {
        redrive_in(self.store, handler, strategy, id).await
    }
}

/// Redrive: the dead letter taken in the transaction, then the unit of work's per-record step
/// ([`identify`], [`claim_one`], [`handle_record`]); a permanent failure is recorded on the
/// dead letter once the transaction is rolled back.
async fn redrive_in<H: Handler<DB>, DB: Backend>(
    store: &Store<DB>,
    handler: &H,
    strategy: &EventId<H::Event>,
    id: i64,
) -> Result<Redriven> {
    let (pool, q) = (store.pool(), store.queries());
    let context = "redriving a dead letter";
    let mut tx = DB::begin(pool, CRATE).await.map_err(Error::db(context))?;
    let Some(letter) = DB::take_dead_letter(&mut tx, q, id)
        .await
        .map_err(Error::db(context))?
    else {
        tx.rollback().await.map_err(Error::db(context))?;
        return Ok(Redriven::NotFound);
    };
    let message = letter.to_message();
    let (event, event_id) = match identify(strategy, &message) {
        Ok(found) => found,
        Err((kind, source)) => {
            tx.rollback().await.map_err(Error::db(context))?;
            return failed_again(store, id, kind, error_chain(source.as_ref())).await;
        }
    };
    let key = PartitionKey {
        group: letter.group.clone(),
        topic: letter.topic.clone(),
        partition: letter.partition,
    };
    if !claim_one::<DB>(&mut tx, q, &key, &event_id, letter.offset)
        .await
        .map_err(Error::db(context))?
    {
        tx.commit().await.map_err(Error::db(context))?;
        return Ok(Redriven::AlreadyApplied { event_id });
    }
    match handle_record(handler, &mut tx, &message, &event_id, event, 1, &q.schema).await {
        Ok(()) => {
            tx.commit().await.map_err(Error::db(context))?;
            tracing::info!(id, topic = %letter.topic, partition = letter.partition, offset = letter.offset, %event_id, "dead letter redriven");
            Ok(Redriven::Applied { event_id })
        }
        Err(RecordFailure::Transient { source, .. }) => {
            tx.rollback().await.map_err(Error::db(context))?;
            Ok(Redriven::Retry {
                error: error_chain(source.as_ref()),
            })
        }
        Err(RecordFailure::Permanent(failure)) => {
            if failure.kind == FailureKind::Panicked {
                // The transaction may be mid-statement: dropping it rolls it back.
                drop(tx);
            } else {
                tx.rollback().await.map_err(Error::db(context))?;
            }
            failed_again(store, id, failure.kind, failure.error).await
        }
    }
}

/// Records another failed attempt on the dead letter `id`.
async fn failed_again<DB: Backend>(
    store: &Store<DB>,
    id: i64,
    kind: FailureKind,
    error: String,
) -> Result<Redriven> {
    DB::dead_letter_failed_again(store.pool(), store.queries(), id, kind, &error)
        .await
        .map_err(Error::db("recording a failed redrive"))?;
    Ok(Redriven::Failed { kind, error })
}
