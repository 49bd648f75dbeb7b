//! A librdkafka mock cluster in a child process, driven over the child's stdin.
//!
//! The mock cluster aborts on internal assertions now and then (about once in 150 chaos
//! trials). Hosted in a child process, an abort ends the child: the parent sees the broker
//! go away, and a command to it fails with the child's exit status, instead of the whole
//! program (or test binary) dying. The topic the broker holds does not count in the parent's
//! memory either, which the benchmark relies on.
//!
//! Two ways to start the child:
//! - a program starts itself again ([`MockBroker::start`] with arguments that make its `main`
//!   call [`serve`]): `bench` and `chaos`;
//! - a test binary starts itself again as libtest with one test selected, the one that
//!   [`mock_broker_entry!`](crate::mock_broker_entry) defines ([`MockBroker::start_in_test`]).
//!   A test harness's `main` is libtest's, so the entry point has to be a test; it is ignored,
//!   and serves only when the environment variable [`CHILD_ENV`] says so.
//!
//! The protocol is one line per command on the child's stdin and one line per answer on its
//! stdout, prefixed with [`PREFIX`] (libtest writes lines of its own there): `ready
//! <bootstrap servers>` once, then `ok` or `err <message>` for each command. The child ends
//! when its stdin closes, that is when the parent drops its [`MockBroker`] or dies.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use consumer_runtime::rdkafka::mocking::MockCluster;
use consumer_runtime::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// The prefix of the child's answers on its stdout.
pub const PREFIX: &str = "mock-broker: ";

/// Set (to `1`) in the environment of a test binary started as the mock broker's child.
pub const CHILD_ENV: &str = "CONSUMER_RUNTIME_TESTKIT_MOCK_BROKER";

/// The name of the test that [`mock_broker_entry!`](crate::mock_broker_entry) defines.
pub const ENTRY_TEST: &str = "testkit_mock_broker_child";

/// A fault or a change the parent asks of the mock cluster (broker 1, the only one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerCommand {
    /// Creates a topic with this many partitions.
    CreateTopic(String, i32),
    /// The broker goes down: connections are closed and new ones refused.
    BrokerDown,
    /// The broker comes back.
    BrokerUp,
    /// The next requests of this API fail with these errors, one each, in order.
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>),
}

/// The API keys [`BrokerCommand::RequestErrors`] can name (the child looks them up by name).
const API_KEYS: &[RDKafkaApiKey] = &[
    RDKafkaApiKey::Produce,
    RDKafkaApiKey::Fetch,
    RDKafkaApiKey::ListOffsets,
    RDKafkaApiKey::Metadata,
    RDKafkaApiKey::OffsetCommit,
    RDKafkaApiKey::OffsetFetch,
    RDKafkaApiKey::FindCoordinator,
    RDKafkaApiKey::JoinGroup,
    RDKafkaApiKey::Heartbeat,
    RDKafkaApiKey::LeaveGroup,
    RDKafkaApiKey::SyncGroup,
];

/// The errors [`BrokerCommand::RequestErrors`] can inject (the child looks them up by name).
const ERRORS: &[RDKafkaRespErr] = &[
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION,
];

fn by_name<T: std::fmt::Debug + Copy>(table: &[T], name: &str, what: &str) -> anyhow::Result<T> {
    table
        .iter()
        .copied()
        .find(|v| format!("{v:?}") == name)
        .with_context(|| format!("the mock broker knows no {what} `{name}` (testkit's table)"))
}

impl BrokerCommand {
    /// The command's line on the child's stdin.
    fn line(&self) -> anyhow::Result<String> {
        Ok(match self {
            BrokerCommand::CreateTopic(topic, partitions) => {
                if topic.contains(char::is_whitespace) {
                    bail!("a topic name without whitespace, not `{topic}`");
                }
                format!("create-topic {topic} {partitions}")
            }
            BrokerCommand::BrokerDown => "broker-down".to_owned(),
            BrokerCommand::BrokerUp => "broker-up".to_owned(),
            BrokerCommand::RequestErrors(api, errors) => {
                by_name(API_KEYS, &format!("{api:?}"), "API key")?;
                let mut line = format!("request-errors {api:?}");
                for e in errors {
                    by_name(ERRORS, &format!("{e:?}"), "error")?;
                    line.push_str(&format!(" {e:?}"));
                }
                line
            }
        })
    }

    /// Reads a command line (the child's side).
    fn parse(line: &str) -> anyhow::Result<BrokerCommand> {
        let mut words = line.split_whitespace();
        let command = words.next().context("an empty command")?;
        let rest: Vec<&str> = words.collect();
        Ok(match (command, rest.as_slice()) {
            ("create-topic", [topic, partitions]) => BrokerCommand::CreateTopic(
                (*topic).to_owned(),
                partitions.parse().context("a partition count")?,
            ),
            ("broker-down", []) => BrokerCommand::BrokerDown,
            ("broker-up", []) => BrokerCommand::BrokerUp,
            ("request-errors", [api, errors @ ..]) => BrokerCommand::RequestErrors(
                by_name(API_KEYS, api, "API key")?,
                errors
                    .iter()
                    .map(|e| by_name(ERRORS, e, "error"))
                    .collect::<anyhow::Result<_>>()?,
            ),
            _ => bail!("unknown command `{line}`"),
        })
    }

    fn apply<C: consumer_runtime::rdkafka::ClientContext>(
        &self,
        cluster: &MockCluster<'_, C>,
    ) -> anyhow::Result<()> {
        match self {
            BrokerCommand::CreateTopic(topic, partitions) => {
                cluster.create_topic(topic, *partitions, 1)?
            }
            BrokerCommand::BrokerDown => cluster.broker_down(1)?,
            BrokerCommand::BrokerUp => cluster.broker_up(1)?,
            BrokerCommand::RequestErrors(api, errors) => cluster.request_errors(*api, errors),
        }
        Ok(())
    }
}

/// The child's side: hosts a one-broker mock cluster (with `topic` of its partitions, if
/// given), prints its bootstrap servers, then carries out commands from stdin until stdin
/// closes.
pub fn serve(topic: Option<(&str, i32)>) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("starting the librdkafka mock cluster")?;
    if let Some((topic, partitions)) = topic {
        cluster
            .create_topic(topic, partitions, 1)
            .context("creating the topic")?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{PREFIX}ready {}", cluster.bootstrap_servers())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match BrokerCommand::parse(&line).and_then(|c| c.apply(&cluster)) {
            Ok(()) => writeln!(out, "{PREFIX}ok")?,
            Err(e) => writeln!(out, "{PREFIX}err {}", format!("{e:#}").replace('\n', " "))?,
        }
        out.flush()?;
    }
    Ok(())
}

/// The test binary's side of [`mock_broker_entry!`](crate::mock_broker_entry): serves and
/// exits if this process was started as the mock broker's child, else returns at once.
pub fn serve_in_test() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let code = match serve(None) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mock broker: {e:#}");
            1
        }
    };
    // Exit before libtest reports on the "test": nothing of it is needed.
    std::process::exit(code);
}

/// The mock broker's child process; dropping it stops the child.
#[derive(Debug)]
pub struct MockBroker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Its bootstrap servers.
    pub bootstrap: String,
}

impl MockBroker {
    /// Starts this program again with `args`, which must make it call [`serve`].
    pub fn start(args: &[&str]) -> anyhow::Result<MockBroker> {
        let exe = std::env::current_exe().context("locating this program")?;
        let mut command = Command::new(exe);
        command.args(args);
        MockBroker::spawn(command, "")
    }

    /// Starts this test binary again as the mock broker's child: libtest runs only the
    /// ignored test that [`mock_broker_entry!`](crate::mock_broker_entry) defines, with
    /// [`CHILD_ENV`] set.
    pub fn start_in_test() -> anyhow::Result<MockBroker> {
        let exe = std::env::current_exe().context("locating this test binary")?;
        let mut command = Command::new(exe);
        command
            .args([ENTRY_TEST, "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, "1");
        MockBroker::spawn(
            command,
            "; does this test binary invoke `testkit::mock_broker_entry!()` at its root?",
        )
    }

    fn spawn(mut command: Command, hint: &str) -> anyhow::Result<MockBroker> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the mock broker's process")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("the mock broker's stdout")?);
        let mut broker = MockBroker {
            child,
            stdin,
            stdout,
            bootstrap: String::new(),
        };
        match broker.answer() {
            Ok(Some(ready)) if ready.starts_with("ready ") => {
                broker.bootstrap = ready["ready ".len()..].trim().to_owned();
                Ok(broker)
            }
            Ok(other) => {
                let _ = broker.child.kill();
                let status = broker.child.wait().context("waiting for the mock broker")?;
                bail!(
                    "the mock broker's process ended ({status}) without an address ({other:?}){hint}"
                );
            }
            Err(e) => Err(e),
        }
    }

    /// The next answer of the child's: what follows [`PREFIX`] on its next line that has it;
    /// `None` once its stdout ends.
    fn answer(&mut self) -> anyhow::Result<Option<String>> {
        let mut line = String::new();
        loop {
            line.clear();
            if self
                .stdout
                .read_line(&mut line)
                .context("reading from the mock broker")?
                == 0
            {
                return Ok(None);
            }
            // libtest may have written `test … ... ` before it on the same line.
            if let Some(at) = line.find(PREFIX) {
                return Ok(Some(line[at + PREFIX.len()..].trim_end().to_owned()));
            }
        }
    }

    /// Carries out `command` in the child; an error if the mock cluster refused it or the
    /// child has died (saying how it ended).
    pub fn command(&mut self, command: &BrokerCommand) -> anyhow::Result<()> {
        let line = command.line()?;
        let sent = self
            .stdin
            .as_mut()
            .context("the mock broker is stopped")
            .and_then(|stdin| {
                writeln!(stdin, "{line}")?;
                stdin.flush()?;
                Ok(())
            });
        match sent.and_then(|()| self.answer()) {
            Ok(Some(answer)) if answer == "ok" => Ok(()),
            Ok(Some(answer)) => bail!(
                "the mock broker refused `{line}`: {}",
                answer.strip_prefix("err ").unwrap_or(&answer)
            ),
            Ok(None) | Err(_) => bail!("`{line}`: {}", self.gone()),
        }
    }

    /// Why the child does not answer: how it ended, if it did within a moment.
    fn gone(&mut self) -> String {
        for _ in 0..50 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("the mock broker's process died ({status})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        "the mock broker's process stopped answering".to_owned()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the child ended, if it did (it runs until dropped otherwise).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// How the child ended, if it did; consumes the handle (and stops a living child).
    pub fn died(mut self) -> Option<ExitStatus> {
        self.exit_status()
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        // Closing its stdin ends the child; kill it if it has not ended a moment later.
        drop(self.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
