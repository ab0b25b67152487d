#!/usr/bin/env python3
"""What one durable PostgreSQL commit costs on this machine, without Muse.

Muse's default (`EXECUTION_WRITES=sync`) answers a model call only once its
execution record is committed, so on PostgreSQL no call can come back
faster than a commit. This measures that floor with PostgreSQL's own load
generator, pgbench: one-row INSERTs into a scratch table (the width of a
short execution row, with the same kind of index), each its own
transaction, at fixed rates (`--rate`: latency counts from the scheduled
start, like the gateway bench's open loop), 8 connections, once with
`synchronous_commit=on` (PostgreSQL's default: the commit waits for the WAL
flush) and once with `off` (it does not).

    python3 scripts/pg_commit_floor.py [DATABASE_URL] [SECONDS] [RATES...]

Defaults: $BENCH_DATABASE_URL or $TEST_DATABASE_URL or
postgres://postgres@127.0.0.1:5432/test, 10 s, 1000 and 4000 commits/s.
The scratch table `muse_commit_floor` is dropped at the end. Prints a
Markdown table: p50 / p99 from the scheduled start (what a caller waits),
then the commit alone (without the time spent queued behind a slow one),
and the slowest commit.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

TABLE = "muse_commit_floor"
SETUP = f"""
DROP TABLE IF EXISTS {TABLE};
CREATE TABLE {TABLE} (id TEXT PRIMARY KEY, user_id TEXT NOT NULL,
    model TEXT NOT NULL, output TEXT, created_at BIGINT NOT NULL);
CREATE INDEX {TABLE}_user_created ON {TABLE} (user_id, created_at);
"""
SCRIPT = f"""\\set user random(1, 100)
INSERT INTO {TABLE} VALUES (gen_random_uuid()::text, 'user-' || :user, 'gpt-4o-mini',
    'A short answer from the model, about as long as a chat reply in the bench.',
    (extract(epoch from clock_timestamp()) * 1000)::bigint);
"""
CONNECTIONS = 8


def percentile(values, q):
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


def run(url, seconds, rate, synchronous_commit, work):
    for old in glob.glob(os.path.join(work, "floor.*")):
        os.remove(old)
    script = os.path.join(work, "floor.sql")
    with open(script, "w") as f:
        f.write(SCRIPT)
    env = dict(os.environ, PGOPTIONS=f"-c synchronous_commit={synchronous_commit}")
    done = subprocess.run(
        ["pgbench", "-n", "-f", script, f"--rate={rate}", "-T", str(seconds),
         "-c", str(CONNECTIONS), "-j", "1", "-l", "--log-prefix=" + os.path.join(work, "floor"),
         url],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    if done.returncode != 0:
        sys.exit(f"pgbench failed (exit {done.returncode}):\n{done.stderr}")
    waited, alone = [], []
    # pgbench -l with --rate: client, transaction, latency µs, script,
    # epoch s, epoch µs, schedule lag µs.
    for log in glob.glob(os.path.join(work, "floor.[0-9]*")):
        with open(log) as f:
            for line in f:
                fields = line.split()
                latency, lag = int(fields[2]), int(fields[6])
                waited.append(latency / 1000)
                alone.append((latency - lag) / 1000)
    if not waited:
        sys.exit(f"pgbench logged no transaction at {rate}/s:\n{done.stderr}")
    return len(waited), waited, alone


def main():
    args = sys.argv[1:]
    url = args[0] if args else (os.environ.get("BENCH_DATABASE_URL")
                                or os.environ.get("TEST_DATABASE_URL")
                                or "postgres://postgres@127.0.0.1:5432/test")
    seconds = int(args[1]) if len(args) > 1 else 10
    rates = [int(r) for r in args[2:]] or [1000, 4000]
    if not shutil.which("pgbench") or not shutil.which("psql"):
        sys.exit("pgbench and psql are needed (Debian: apt-get install postgresql-client)")
    if subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-c", SETUP, url]).returncode != 0:
        sys.exit(f"cannot create the scratch table {TABLE} (psql's error above)")
    print(f"One-row INSERT commits, pgbench, {CONNECTIONS} connections, {seconds} s per row (ms)\n")
    print("| commits/s | synchronous_commit | transactions | p50 / p99 from the scheduled start "
          "| p50 / p99 of the commit alone | slowest |")
    print("|---:|---|---:|---|---|---:|")
    try:
        with tempfile.TemporaryDirectory() as work:
            for rate in rates:
                for mode in ("on", "off"):
                    n, waited, alone = run(url, seconds, rate, mode, work)
                    print(f"| {rate:,} | {mode} | {n:,} | {percentile(waited, .5):.3f} / "
                          f"{percentile(waited, .99):.3f} | {percentile(alone, .5):.3f} / "
                          f"{percentile(alone, .99):.3f} | {max(alone):.3f} |", flush=True)
    finally:
        subprocess.run(["psql", "-q", "-c", f"DROP TABLE IF EXISTS {TABLE}", url], check=False)


if __name__ == "__main__":
    main()
