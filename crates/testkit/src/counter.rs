//! The test handler: a non-idempotent effect, with knobs to fail, panic, stall or freeze on
//! chosen events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use consumer_runtime::{Context, Handler, HandlerError, Json};

use crate::TestDb;

/// The test handler: applies the non-idempotent effect ([`TestDb::apply_effect`]). An optional
/// per-record delay makes runs long enough to interrupt, and `applied` counts handler calls.
#[derive(Clone)]
pub struct Counter {
    /// The consumer group whose effects it writes (and, in [`Consumer`](crate::Consumer), the
    /// group it consumes in).
    pub group: String,
    /// How long it sleeps before each record.
    pub delay: Duration,
    /// Handler calls that returned `Ok`.
    pub applied: Arc<AtomicU64>,
    /// Event ids whose handler returns an error (`reject` or `retry`).
    pub fail_on: Option<(String, bool)>,
    /// The event id whose handler writes its effect and then never returns.
    pub stall_on: Option<String>,
    /// Set once the handler stalls.
    pub stalled: Arc<AtomicBool>,
    /// Event ids whose handler writes its effect and then panics.
    pub panic_on: Option<String>,
    /// The event id whose handler, the first time, writes its effect and then sleeps this long
    /// (a consumer frozen mid-transaction that later wakes up).
    pub freeze_on: Option<(String, Duration)>,
    /// True while that handler sleeps.
    pub frozen: Arc<AtomicBool>,
    /// Set once that handler went to sleep.
    pub froze: Arc<AtomicBool>,
    /// Handler calls, whatever their outcome.
    pub calls: Arc<AtomicU64>,
}

impl Counter {
    /// A handler for `group` with no delay and no failures.
    pub fn new(group: &str) -> Counter {
        Counter {
            group: group.to_owned(),
            delay: Duration::ZERO,
            applied: Arc::new(AtomicU64::new(0)),
            fail_on: None,
            stall_on: None,
            stalled: Arc::new(AtomicBool::new(false)),
            panic_on: None,
            freeze_on: None,
            frozen: Arc::new(AtomicBool::new(false)),
            froze: Arc::new(AtomicBool::new(false)),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }
    /// The same handler, sleeping `d` before each record.
    pub fn with_delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    /// Handler calls so far that returned `Ok`.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }
}

impl<DB: TestDb> Handler<DB> for Counter {
    type Event = Json<serde_json::Value>;

    async fn handle(
        &self,
        ctx: &mut Context<'_, DB>,
        _event: Json<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let id = ctx.record().event_id();
        DB::apply_effect(ctx.conn(), &self.group, id).await?;
        if let Some((fail, reject)) = &self.fail_on
            && fail == id
        {
            return Err(if *reject {
                HandlerError::reject(format!("test rejects {id}"))
            } else {
                HandlerError::retry(format!("test fails {id}"))
            });
        }
        if self.panic_on.as_deref() == Some(id) {
            panic!("test panics on {id}");
        }
        if let Some((freeze, how_long)) = &self.freeze_on
            && freeze == id
            && !self.froze.swap(true, Ordering::SeqCst)
        {
            self.frozen.store(true, Ordering::SeqCst);
            tokio::time::sleep(*how_long).await;
            self.frozen.store(false, Ordering::SeqCst);
        }
        if self.stall_on.as_deref() == Some(id) {
            // The effect is written but not committed: the test now drops the runtime.
            self.stalled.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
