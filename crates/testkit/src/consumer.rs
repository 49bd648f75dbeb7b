//! A consumer under test: the runtime with the [`Counter`] handler on a spawned task, and what
//! tests do with it (catch up, stop, crash).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use consumer_runtime::sqlx::Pool;
use consumer_runtime::{Runtime, RuntimeBuilder, ShutdownHandle, Stats};
use tokio::task::JoinHandle;

use crate::{CAUGHT_UP, Counter, Kafka, Record, TestDb, ends_of, stored_offsets};

/// A runtime for the test handler on `topic` of the mock cluster, with signals left alone and
/// a short session timeout so that a crashed member's partitions move quickly.
pub fn test_runtime<DB: TestDb>(
    kafka: &Kafka,
    pool: &Pool<DB>,
    handler: Counter,
    topic: &str,
) -> RuntimeBuilder<Counter, DB> {
    Runtime::builder(handler)
        .pool(pool.clone())
        .brokers(kafka.bootstrap.clone())
        .topic(topic)
        .handle_signals(false)
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500")
}

/// A running consumer of `topic` in the group of its [`Counter`]: [`test_runtime`] built with
/// the test's settings, on a spawned task.
pub struct Consumer<DB: TestDb> {
    /// The handler (clones share its counts and flags).
    pub counter: Counter,
    /// The runtime's counters.
    pub stats: Arc<Stats>,
    kafka: Kafka,
    pool: Pool<DB>,
    topic: String,
    stop: ShutdownHandle,
    task: Option<JoinHandle<consumer_runtime::Result<()>>>,
}

impl<DB: TestDb> Consumer<DB> {
    /// Builds the runtime (`configure` adds the test's settings to [`test_runtime`]) and
    /// spawns it.
    pub fn start(
        kafka: &Kafka,
        pool: &Pool<DB>,
        topic: &str,
        counter: Counter,
        configure: impl FnOnce(RuntimeBuilder<Counter, DB>) -> RuntimeBuilder<Counter, DB>,
    ) -> Consumer<DB> {
        let builder = test_runtime(kafka, pool, counter.clone(), topic).group(&counter.group);
        let rt = configure(builder).build().expect("build the runtime");
        Consumer {
            counter,
            stats: rt.stats(),
            kafka: kafka.clone(),
            pool: pool.clone(),
            topic: topic.to_owned(),
            stop: rt.shutdown_handle(),
            task: Some(tokio::spawn(rt.run())),
        }
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.counter.group
    }

    /// True until the runtime's task ends.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits (up to [`CAUGHT_UP`]) until the group's stored offsets reach `ends` on every
    /// partition. Fails at once if the consumer ends or the mock broker dies meanwhile.
    pub async fn wait_caught_up(&mut self, ends: &HashMap<i32, i64>) {
        self.wait_caught_up_within(CAUGHT_UP, ends).await;
    }

    /// [`Consumer::wait_caught_up`] with its own deadline.
    pub async fn wait_caught_up_within(&mut self, timeout: Duration, ends: &HashMap<i32, i64>) {
        let deadline = Instant::now() + timeout;
        loop {
            let stored = stored_offsets(&self.pool, self.group()).await;
            if ends
                .iter()
                .all(|(p, end)| stored.get(&(self.topic.clone(), *p)) == Some(end))
            {
                return;
            }
            if let Some(died) = self.kafka.died() {
                panic!("{died} before the consumer caught up (stored {stored:?})");
            }
            if !self.is_running() {
                let result = self.task.take().expect("the task").await;
                panic!("the consumer ended before it caught up: {result:?}");
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the stored offsets ({stored:?}) to reach the end of the \
                 topic ({ends:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the runtime gracefully and checks that it was still running and ends without an
    /// error.
    pub async fn stop(mut self) {
        assert!(self.is_running(), "the consumer stopped on its own");
        self.stop.shutdown();
        let task = self.task.take().expect("the task");
        task.await
            .expect("the runtime's task panicked")
            .expect("clean shutdown");
    }

    /// Waits until the group's stored offsets reach the end of `records`, then
    /// [`stop`](Consumer::stop)s.
    pub async fn catch_up_and_stop(mut self, records: &[Record]) {
        self.wait_caught_up(&ends_of(records)).await;
        self.stop().await;
    }

    /// Ends the runtime as a crash would: its task is dropped where it stands, nothing is shut
    /// down.
    pub async fn crash(mut self) {
        let task = self.task.take().expect("the task");
        task.abort();
        let result = task.await;
        assert!(
            result.as_ref().is_err_and(|e| e.is_cancelled()),
            "the consumer ended on its own before the crash: {result:?}"
        );
    }
}

impl<DB: TestDb> Drop for Consumer<DB> {
    fn drop(&mut self) {
        // A test that panics leaves no runtime behind on the test's tokio runtime.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
