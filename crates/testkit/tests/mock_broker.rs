//! The mock broker lives in a child process: when it aborts (as librdkafka's mock cluster does
//! on an internal assertion now and then), the test using it fails with a clear error and the
//! test binary goes on.

use std::time::Duration;

use consumer_runtime::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use consumer_runtime::sqlx::Sqlite;
use testkit::mock_broker::{BrokerCommand, MockBroker};
use testkit::*;

testkit::mock_broker_entry!();

fn abort(pid: u32) {
    // SIGABRT is what a failed assertion in librdkafka raises.
    let status = std::process::Command::new("kill")
        .args(["-ABRT", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[test]
fn an_aborted_mock_broker_is_an_error_naming_the_signal_not_the_end_of_the_test_binary() {
    let mut broker = MockBroker::start_in_test().expect("start the mock broker");
    broker
        .command(&BrokerCommand::CreateTopic("t".into(), 2))
        .expect("create a topic");
    broker
        .command(&BrokerCommand::RequestErrors(
            RDKafkaApiKey::Fetch,
            vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 2],
        ))
        .expect("inject fetch errors");
    assert!(broker.exit_status().is_none(), "the broker runs");

    abort(broker.pid());
    // `kill` returns once the signal is sent, not once it is handled: a command written in
    // between could still be carried out. Wait, with a deadline, for the child to be gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while broker.exit_status().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker outlived SIGABRT by 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = broker
        .command(&BrokerCommand::BrokerDown)
        .expect_err("a dead broker cannot take commands");
    let text = format!("{err:#}");
    assert!(
        text.contains("the mock broker's process died") && text.contains("SIGABRT"),
        "{text}"
    );
    // This process is still here to say so.
}

#[test]
fn the_mock_cluster_carries_out_the_faults_and_refuses_what_it_cannot() {
    if testkit::mock_only(
        "the_mock_cluster_carries_out_the_faults_and_refuses_what_it_cannot",
        "tests the mock cluster's faults",
    ) {
        return;
    }
    let kafka = Kafka::new();
    kafka.create_topic("faults", 1);
    kafka.broker_down();
    kafka.broker_up();
    kafka.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION],
    );
    // The records still arrive after the outage.
    let (records, _) = events_with_duplicates("faults", 3, 1, 0);
    kafka.produce("faults", &records);
    let mut broker = MockBroker::start_in_test().unwrap();
    let err = broker
        .command(&BrokerCommand::CreateTopic("bad name".into(), 1))
        .unwrap_err();
    assert!(err.to_string().contains("without whitespace"), "{err:#}");
    assert!(kafka.died().is_none());
}

/// A consumer waiting to catch up when its broker aborts fails at once, naming the cause,
/// instead of timing out (or taking the test binary down with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_broker_aborts_fails_its_test_at_once_saying_why() {
    if testkit::mock_only(
        "a_consumer_whose_broker_aborts_fails_its_test_at_once_saying_why",
        "aborts the mock broker's process",
    ) {
        return;
    }
    let pool = <Sqlite as TestDb>::pool().await;
    let (kafka, topic, group, records, _) = produced("abort", 1, 10, 0);
    let mut consumer = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| rt);
    consumer.wait_caught_up(&ends_of(&records)).await;

    abort(kafka.pid());
    let mut more = ends_of(&records);
    *more.get_mut(&0).unwrap() += 1;
    let started = std::time::Instant::now();
    let waiting = tokio::spawn(async move { consumer.wait_caught_up(&more).await });
    let panic = waiting.await.expect_err("the wait must fail").into_panic();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("the mock broker's process died") && message.contains("SIGABRT"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it failed at its deadline"
    );
}
