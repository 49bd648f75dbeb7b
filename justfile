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
