# Tasks for developers. Every recipe is a plain cargo/psql command: `just` is optional.

# PostgreSQL the tests use (override with DATABASE_URL).
export DATABASE_URL := env_var_or_default("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")

# The quickstart: no services needed (mock Kafka in-process, a SQLite file).
quickstart:
    cargo run --example quickstart

# Run the whole test suite (needs PostgreSQL; Kafka is a mock broker in a child process per test).
test:
    cargo test --workspace

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all --check
    cargo clippy --all-targets -- -D warnings

# Start the local PostgreSQL cluster if it is down (Debian's pg_ctlcluster).
pg-up:
    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -n1) main start || true
    pg_isready -h 127.0.0.1 -p 5432

# A rough throughput figure for the three guarantees and batch size 1, on both backends.
throughput:
    cargo test --release --test runtime rough_throughput -- --ignored --nocapture --test-threads=1

# The crash-consistency program: N trials of SIGKILL, SIGSTOP zombies, PostgreSQL restarts and
# replays against consumer processes, every event checked (e.g. `just chaos 50`).
chaos trials="20":
    cargo run --release --bin chaos -- --trials {{trials}}


# ---- A real broker: the behaviour suites against tansu ---------------------------------------
# The suites run against any broker named by KAFKA_BROKERS (topics are created and deleted
# through the admin API; the few tests whose faults only the mock can inject are skipped, saying
# so). These recipes do it with tansu, a Kafka-protocol broker installed from crates.io.

tansu_version := "0.6.0"
tansu_root := env_var_or_default("TANSU_ROOT", justfile_directory() / "target/tansu")
tansu_addr := "127.0.0.1:19092"

# Installs tansu from crates.io into target/tansu (once; a long build).
tansu-install:
    test -x {{tansu_root}}/bin/tansu || cargo install tansu --version {{tansu_version}} --locked --features dynostore,postgres --root {{tansu_root}}

# storage is `memory://tansu/` or a `postgres://…` URL of a database holding tansu's schema
# (`etc/initdb.d/010-schema.sql` of tansu's repository at its tag v0.6.0).
# Starts tansu on 127.0.0.1:19092 in the background (log: target/tansu.log).
tansu-up storage="memory://tansu/": tansu-install
    test ! -e target/tansu.pid || ! kill -0 $(cat target/tansu.pid) 2>/dev/null || { echo "tansu already runs (pid $(cat target/tansu.pid)); just tansu-down first" >&2; exit 1; }
    nohup {{tansu_root}}/bin/tansu broker --listener-url tcp://{{tansu_addr}} --advertised-listener-url tcp://{{tansu_addr}} --storage-engine '{{storage}}' > target/tansu.log 2>&1 & echo $! > target/tansu.pid
    for i in $(seq 100); do grep -q '^ready in' target/tansu.log && exit 0; kill -0 $(cat target/tansu.pid) 2>/dev/null || break; sleep 0.1; done; echo "tansu did not start on {{tansu_addr}}; target/tansu.log:" >&2; cat target/tansu.log >&2; rm -f target/tansu.pid; exit 1

# Stops the tansu that tansu-up started.
tansu-down:
    test ! -e target/tansu.pid || { pid=$(cat target/tansu.pid); kill $pid 2>/dev/null; for i in $(seq 50); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done; }
    rm -f target/tansu.pid

# The suites' producers send one record per batch: tansu 0.6.0's memory storage cannot fetch
# from an offset inside a stored batch, and answers a batch's base offset + 1 as the high
# watermark (`just probe-tansu` shows both).
# Installs and starts tansu, runs the behaviour suites against it, and stops it.
test-tansu storage="memory://tansu/": (tansu-up storage)
    export KAFKA_BROKERS={{tansu_addr}} KAFKA_ONE_RECORD_PER_BATCH=1; \
    cargo test --no-fail-fast -p consumer-runtime --test runtime --test replay --test failures --test handler --test otel -- --test-threads=2; status=$?; \
    cargo test -p consumer-runtime-cli --test cli -- --test-threads=2 || status=1; \
    {{just_executable()}} tansu-down; exit $status

# Asks tansu, with a plain librdkafka client, what the suites' results turn on (started and stopped around it).
probe-tansu storage="memory://tansu/": (tansu-up storage)
    KAFKA_BROKERS={{tansu_addr}} cargo run -p consumer-runtime-testkit --example broker_probe; status=$?; {{just_executable()}} tansu-down; exit $status
