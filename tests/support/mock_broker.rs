//! A librdkafka mock cluster in a child process: the program starts itself again with
//! arguments that make the child call [`serve`], and reads the bootstrap servers from it. The
//! topic the broker holds then does not count in the parent's memory, and a crash of the mock
//! cluster (it aborts on internal assertions now and then) ends the child, not the parent.
//!
//! Self-contained (std, anyhow and rdkafka through consumer-runtime): the `bench` and `chaos`
//! programs include this file.

use std::io::{BufRead as _, Read as _, Write as _};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use consumer_runtime::rdkafka::mocking::MockCluster;

/// The child's side: hosts a one-broker mock cluster with `topic` of `partitions` partitions,
/// prints its bootstrap servers on stdout, and lives until its stdin closes (the parent
/// ending, or dropping its [`MockBroker`]).
pub fn serve(topic: &str, partitions: i32) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("starting the librdkafka mock cluster")?;
    cluster
        .create_topic(topic, partitions, 1)
        .context("creating the topic")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", cluster.bootstrap_servers())?;
    out.flush()?;
    drop(out);
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

/// The mock broker's child process; dropping it stops the child.
pub struct MockBroker {
    child: Child,
    /// Its bootstrap servers.
    pub bootstrap: String,
}

impl MockBroker {
    /// Starts this program again with `args`, which must make it call [`serve`].
    pub fn start(args: &[&str]) -> anyhow::Result<MockBroker> {
        let exe = std::env::current_exe().context("locating this program")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the mock broker's process")?;
        let stdout = child.stdout.take().context("the mock broker's stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the mock broker's address")?;
        let bootstrap = line.trim().to_owned();
        if bootstrap.is_empty() {
            let _ = child.kill();
            let status = child.wait().context("waiting for the mock broker")?;
            bail!("the mock broker's process ended ({status}) without an address");
        }
        Ok(MockBroker { child, bootstrap })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the child ended, if it did (it runs until dropped otherwise).
    pub fn died(mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        // Closing its stdin ends the child; kill it if it has not ended a moment later.
        drop(self.child.stdin.take());
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
