#!/usr/bin/env python3
"""Replays on a current ClickHouse (chdb, in process) what the test suite sent to ClickHouse 18.16.

Run by scripts/compat after the suite ran with TOPK_TEST_KEEP_DATABASES=1 (its databases kept)
and the stack's ClickHouse logging every statement (`log_queries`) with the database a test
used as its quota key (the tests pass `--clickhouse-quota-key=<database>`). Steps:

1. Read the successful statements of `system.query_log`, group them into *shapes* (the text
   with literals, lists and generated names replaced) and kinds (ddl, select, insert data,
   insert select, mutation, partition, optimize, metadata).
2. Pick few databases that together hold an instance of every shape, smallest first.
3. For each: replay its schema statements in chdb in the order 18.16 ran them (every DDL, on
   empty tables), compare every table's columns and engine, copy its rows (physical rows,
   RowBinary, merges stopped on 18.16 so both hold the same parts' rows), compare every table
   row for row, replay the read statements on both and compare their results row for row,
   then replay the writes (insert select, mutations, partition moves, optimize) on both and
   compare every table again (FINAL where the engine collapses).
4. Print statements by kind, shapes replayed, rows compared and every difference; exit 1 on
   a difference or on a shape nothing replayed. `--keep` leaves the databases; otherwise they
   are dropped at the end.
"""

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

URL = os.environ.get("TOPK_CLICKHOUSE_URL", "http://127.0.0.1:8123")
# The stack's cluster shards and replicas: their statements are counted, not replayed (below).
CLUSTER_URLS = [u for u in (
    os.environ.get("TOPK_TEST_CLICKHOUSE_SHARD_URLS", "http://127.0.0.1:8131,http://127.0.0.1:8132")
    + "," + os.environ.get("TOPK_TEST_CLICKHOUSE_REPLICA_URLS",
                           "http://127.0.0.1:8141,http://127.0.0.1:8142")).split(",") if u]
# Settings the stack's profile sets on every statement: not the client's.
PROFILE_SETTINGS = {"log_queries", "max_memory_usage", "load_balancing"}
COLLAPSING = ("ReplacingMergeTree", "SummingMergeTree", "CollapsingMergeTree",
              "AggregatingMergeTree", "VersionedCollapsingMergeTree")
INSTANCES_PER_SHAPE = 4
SAMPLE_LINES = 5


class ServerError(Exception):
    pass


def server(sql, database=None, settings=None, data=None, url=None):
    """One statement on the 18.16 server over HTTP; its output as bytes."""
    params = {"query": sql}
    if database:
        params["database"] = database
    params.update(settings or {})
    request = urllib.request.Request(
        (url or URL) + "/?" + urllib.parse.urlencode(params), data=data if data is not None else b"")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        raise ServerError(error.read().decode(errors="replace").strip()) from None


def server_rows(sql, **kwargs):
    return json.loads(server(sql + " FORMAT JSONCompact", **kwargs))["data"]


def shape(query, database):
    """The statement with its database, generated names, literals and lists replaced."""
    text = query.replace(database, "<db>")
    text = re.sub(r"_[0-9a-f]{16}\b", "_<id>", text)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "?", text)
    text = re.sub(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b", "?", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\?(?:\s*,\s*\?)+", "?…", text)
    text = re.sub(r"\(\?…?\)(?:\s*,\s*\(\?…?\))+", "(?…)…", text)
    return text


def kind(text):
    upper = text.upper()
    first = upper.split(" ", 1)[0]
    if first == "INSERT":
        return "insert select" if re.search(r"\bSELECT\b", upper) else "insert data"
    if first in ("SELECT", "WITH"):
        return "select"
    if first == "ALTER":
        if re.search(r"\b(DELETE|UPDATE)\b", upper) and not re.search(r"\bDETACH\b", upper):
            return "mutation"
        if re.search(r"\b(PARTITION)\b", upper):
            return "partition"
        return "ddl"
    if first in ("CREATE", "DROP", "RENAME", "TRUNCATE"):
        return "ddl"
    if first == "OPTIMIZE":
        return "optimize"
    if first in ("EXISTS", "SHOW", "DESCRIBE", "DESC"):
        return "metadata"
    return first.lower()


def canonical(output):
    """TSV output with 18.16's rendering of the zero Date and DateTime (all zeros) written as a
    current ClickHouse writes the same value (the epoch); the values are equal (RowBinary, which
    the product reads, is the same on both)."""
    return (output.replace(b"0000-00-00 00:00:00", b"1970-01-01 00:00:00")
            .replace(b"0000-00-00", b"1970-01-01"))


def strip_format(query):
    return re.sub(r"\s+FORMAT\s+\w+\s*$", "", query.strip().rstrip(";"), flags=re.I)


def ordered(query):
    """Whether the outermost statement orders its rows (an ORDER BY after the last ')')."""
    tail = query[query.rfind(")") + 1:] if ")" in query else query
    return re.search(r"\bORDER\s+BY\b", tail, re.I) is not None


class Replay:
    def __init__(self, session):
        self.session = session
        self.by_kind = collections.Counter()        # statements of the suite, by kind
        self.shapes_by_kind = collections.Counter()
        self.replayed = set()                       # shapes run on the new engine as on 18.16
        self.compared = set()                       # shapes whose results were compared
        self.differences = []
        self.rows_compared = 0
        self.statements_replayed = collections.Counter()
        self.new = self.chdb("SELECT version()").decode().strip()
        # Merges stopped on both sides: both hold the rows of the same parts until compared.
        self.chdb("SYSTEM STOP MERGES")
        # 25.8 replaces from an empty partition; 26.x refuses unless this setting says it may.
        self.empty_source_setting = self.chdb(
            "SELECT count() FROM system.settings "
            "WHERE name = 'allow_replace_partition_from_empty_source'").strip() == b"1"

    def chdb(self, sql, fmt="TabSeparated"):
        return self.session.query(sql, fmt).bytes()

    def differ(self, what, db, query, left, right):
        self.differences.append((what, db, query, left, right))

    # The schema: every DDL, partition and insert-select statement, in the order 18.16 ran
    # them, on empty tables (the writes run again on the data below). Their data is gone (the suite's staging tables, the rows before a migration), so
    # a replace from a staging table here always replaces from an empty partition, which 26.9
    # refuses unless told: the product itself never does it (backfill drops an empty day;
    # tests/archive.rs checks it), so the replay says it may.
    def schema(self, db, statements):
        self.chdb(f"CREATE DATABASE IF NOT EXISTS {db}")
        self.chdb(f"USE {db}")
        for text, query in statements:
            sql = strip_format(query)
            if self.empty_source_setting and re.search(r"\bREPLACE PARTITION\b", sql, re.I):
                sql += " SETTINGS allow_replace_partition_from_empty_source = 1"
            try:
                self.chdb(sql)
            except Exception as error:  # noqa: BLE001 (chdb raises its own errors)
                self.differ(f"schema statement fails on {self.new}", db, query, "ok on 18.16",
                            str(error))
                continue
            if re.match(r"\s*CREATE DATABASE", sql, re.I):
                self.chdb(f"USE {db}")  # again, after a test dropped its database
            self.replayed.add(text)
            self.statements_replayed["schema"] += 1

    def tables(self, db):
        rows = server_rows(
            f"SELECT name, engine FROM system.tables WHERE database = '{db}' ORDER BY name")
        return [(name, engine) for name, engine in rows]

    def columns(self, db, table):
        return server_rows(
            f"SELECT name, type, default_kind FROM system.columns "
            f"WHERE database = '{db}' AND table = '{table}'")

    def compare_schema(self, db):
        ours = self.tables(db)
        theirs = [tuple(line.split("\t")) for line in self.chdb(
            f"SELECT name, engine FROM system.tables WHERE database = '{db}' ORDER BY name"
        ).decode().splitlines()]
        if ours != theirs:
            self.differ("tables", db, "system.tables", ours, theirs)
        for table, _ in ours:
            left = [(n, t) for n, t, _ in self.columns(db, table)]
            right = [tuple(line.split("\t")) for line in self.chdb(
                f"SELECT name, type FROM system.columns WHERE database = '{db}' "
                f"AND table = '{table}' ORDER BY position").decode().splitlines()]
            if left != right:
                self.differ("columns", db, table, left, right)
        return ours

    def copy_rows(self, db, tables):
        for table, engine in tables:
            if "MergeTree" not in engine:
                continue
            # Table by table too: 26.9 merges a table created after a global STOP MERGES.
            self.chdb(f"SYSTEM STOP MERGES {db}.{table}")
            # MATERIALIZED columns as stored: computed again they could differ, or throw
            # (flush_log's fence is a MATERIALIZED throwIf on the time of the insert).
            stored = [(n, t) for n, t, k in self.columns(db, table) if k != "ALIAS"]
            names = ", ".join(n for n, _ in stored)
            structure = ", ".join(f"{n} {t}" for n, t in stored)
            # Part by part, oldest first, each an insert of its own: the copy holds the same
            # parts in the same order, so FINAL keeps the same row of a key (a
            # ReplacingMergeTree without a version keeps the last inserted).
            parts = [name for (name,) in server_rows(
                f"SELECT name FROM system.parts WHERE database = '{db}' AND table = "
                f"'{table}' AND active ORDER BY min_block_number, partition, name")]
            for part in parts:
                data = server(f"SELECT {names} FROM {db}.{table} WHERE _part = '{part}' "
                              "FORMAT RowBinary", settings={"max_threads": "1"})
                with tempfile.NamedTemporaryFile(suffix=".bin") as f:
                    f.write(data)
                    f.flush()
                    self.chdb(f"INSERT INTO {db}.{table} ({names}) SELECT * FROM "
                              f"file('{f.name}', 'RowBinary', '{structure}') "
                              f"SETTINGS optimize_on_insert = 0, "
                              f"insert_allow_materialized_columns = 1, max_threads = 1, "
                              f"max_insert_threads = 1")

    def compare_tables(self, db, tables, logical):
        for table, engine in tables:
            if "MergeTree" not in engine:
                continue
            names = ", ".join(n for n, _, k in self.columns(db, table) if k != "ALIAS")
            final = " FINAL" if logical and engine.endswith(COLLAPSING) else ""
            sql = f"SELECT {names} FROM {db}.{table}{final} ORDER BY {names}"
            left = canonical(server(sql + " FORMAT TabSeparated"))
            right = self.chdb(sql)
            self.rows_compared += left.count(b"\n")
            if left != right:
                self.differ(f"table {table}{final}", db, sql, left, right)

    def read(self, db, text, query, settings):
        sql = strip_format(query)
        try:
            left = canonical(server(sql + " FORMAT TabSeparated", database=db,
                                    settings=settings))
        except ServerError as error:
            # The statement ran during the suite but not on the final data (e.g. a table a
            # test dropped): not a replay.
            return str(error)
        clauses = ", ".join(f"{k} = {v!r}" if not v.isdigit() else f"{k} = {v}"
                            for k, v in settings.items())
        try:
            right = self.chdb(sql + (f" SETTINGS {clauses}" if clauses and
                                     " SETTINGS " not in sql.upper() else ""))
        except Exception as error:  # noqa: BLE001
            self.differ(f"read fails on {self.new}", db, query, left, str(error))
            return None
        self.replayed.add(text)
        self.statements_replayed["select"] += 1
        if re.search(r"\b(now|today|rand\w*|generateUUIDv4)\s*\(", sql, re.I):
            return None  # the clock or chance: runs on both, nothing to compare
        self.rows_compared += left.count(b"\n")
        same = left == right or (not ordered(sql) and
                                 sorted(left.splitlines()) == sorted(right.splitlines()))
        if not same:
            self.differ("read result", db, query, left, right)
        self.compared.add(text)
        return None

    def write(self, db, text, kind_, query):
        sql = strip_format(query)
        try:
            server(sql, database=db)
        except ServerError as error:
            return str(error)
        if kind_ == "mutation":
            wait_for_mutations(db)
        try:
            self.chdb(sql + (" SETTINGS mutations_sync = 2" if kind_ == "mutation" else ""))
        except Exception as error:  # noqa: BLE001
            self.differ(f"{kind_} fails on {self.new}", db, query, "ok on 18.16", str(error))
            return None
        self.replayed.add(text)
        self.compared.add(text)  # the tables are compared after the writes
        self.statements_replayed[kind_] += 1
        return None


def wait_for_mutations(db):
    for _ in range(600):
        if not server_rows(f"SELECT 1 FROM system.mutations WHERE database = '{db}' "
                           "AND is_done = 0"):
            return
        time.sleep(0.1)
    raise SystemExit(f"mutations of {db} still running on 18.16 after 60 s")


def wait_for_merges():
    """Until no merge runs on 18.16: one that ends while the rows are copied would replace the
    parts being copied by one that is not."""
    for _ in range(600):
        if not server_rows("SELECT 1 FROM system.merges"):
            return
        time.sleep(0.1)
    raise SystemExit("merges still running on 18.16 60 s after SYSTEM STOP MERGES")


def suite_statements(since=0, url=None):
    """(database, time, query, settings) of every statement the suite ran, in order."""
    url = url or URL
    server("SYSTEM FLUSH LOGS", url=url)
    # One stream (max_threads = 1) reads the log in the order it was written.
    data = server(
        "SELECT quota_key, toUInt32(event_time) AS time, query, Settings.Names, "
        "Settings.Values, type FROM system.query_log "
        f"WHERE quota_key != '' AND is_initial_query AND type != 1 "
        f"AND event_time >= toDateTime({int(since)}) "
        # The tests' own reading of the server's log is not the product's and has no
        # counterpart in an embedded ClickHouse.
        "AND query NOT LIKE '%system.query_log%' AND query NOT LIKE 'SYSTEM FLUSH LOGS%' "
        "FORMAT JSONEachRow",
        settings={"max_threads": "1"}, url=url)
    rows = []
    for line in data.decode(errors="replace").splitlines():
        row = json.loads(line)
        if re.fullmatch(r"\w+", row["quota_key"]):  # the tests' keys are database names
            rows.append(row)
    rows.sort(key=lambda row: int(row["time"]))  # a stable sort: the log's order within a second
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the test databases")
    parser.add_argument("--session", default=None, help="chdb data directory")
    parser.add_argument("--since", type=int, default=0,
                        help="only statements from this Unix time on (the suite's start)")
    args = parser.parse_args()

    from chdb import __version__ as chdb_version  # noqa: E402 (installed by scripts/compat)
    from chdb.session import Session

    started = time.monotonic()
    session_dir = args.session or tempfile.mkdtemp(prefix="topk-compat-")
    session = Session(session_dir)
    replay = Replay(session)
    old = server("SELECT version()").decode().strip()
    new = session.query("SELECT version()", "TSV").bytes().decode().strip()
    print(f"compat: ClickHouse {old} (server) against {new} (chdb {chdb_version})")

    rows = suite_statements(args.since)
    existing = {name for (name,) in server_rows("SELECT name FROM system.databases")}
    sizes = {db: int(n) for db, n in server_rows(
        "SELECT database, sum(rows) FROM system.parts WHERE active GROUP BY database")}
    failed = collections.Counter()
    # shape -> {database: [(query, settings)]}; per database its schema statements in order
    instances = collections.defaultdict(lambda: collections.defaultdict(list))
    schema = collections.defaultdict(list)
    kinds = {}
    for row in rows:
        db, query = row["quota_key"], row["query"]
        text = shape(query, db)
        kinds[text] = kind(text)
        if int(row["type"]) != 2:
            failed[kinds[text]] += 1
            continue
        replay.by_kind[kinds[text]] += 1
        if db not in existing:
            continue
        settings = {n: v for n, v in zip(row["Settings.Names"], row["Settings.Values"])
                    if n not in PROFILE_SETTINGS}
        if kinds[text] in ("ddl", "partition", "insert select"):
            schema[db].append((text, query))
        same_text = [q for q, _ in instances[text][db]]
        if query not in same_text:
            instances[text][db].append((query, settings))
    shapes = {text for row in rows if int(row["type"]) == 2
              for text in [shape(row["query"], row["quota_key"])]}
    for text in shapes:
        replay.shapes_by_kind[kinds[text]] += 1

    # Few, small databases holding every shape: the smallest first, each taken only when it
    # holds a shape not yet held.
    chosen, held = [], set()
    for db in sorted({db for by_db in instances.values() for db in by_db},
                     key=lambda db: (sizes.get(db, 0), db)):
        mine = {text for text, by_db in instances.items() if db in by_db}
        if mine - held:
            chosen.append(db)
            held |= mine
    print(f"compat: {len(rows)} statements of the suite in {len(sizes)} databases kept; "
          f"replaying {len(chosen)} of them ({sum(sizes.get(db, 0) for db in chosen)} rows)")

    server("SYSTEM STOP MERGES")
    wait_for_merges()
    not_replayable = collections.defaultdict(list)
    try:
        for db in chosen:
            replay.schema(db, schema[db])
            tables = replay.compare_schema(db)
            replay.copy_rows(db, tables)
            replay.compare_tables(db, tables, logical=False)
            replay.compare_tables(db, tables, logical=True)
            picks = [(text, query, settings) for text, by_db in instances.items()
                     for query, settings in by_db.get(db, [])[:INSTANCES_PER_SHAPE]]
            for text, query, settings in picks:
                if kinds[text] in ("select", "metadata"):
                    error = replay.read(db, text, query, settings)
                    if error:
                        not_replayable[text].append(error)
            for text, query, _ in picks:
                if kinds[text] in ("insert select", "mutation", "partition", "optimize"):
                    error = replay.write(db, text, kinds[text], query)
                    if error and kinds[text] != "partition":
                        not_replayable[text].append(error)
            replay.compare_tables(db, tables, logical=True)
            print(f"compat: {db}: {len(tables)} tables, {sizes.get(db, 0)} rows, "
                  f"{len(picks)} statements")
    finally:
        server("SYSTEM START MERGES")

    # Inserts with data are replayed by the copy: every row they wrote is in chdb and compared.
    for text in shapes:
        if kinds[text] == "insert data" and any(db in chosen for db in instances[text]):
            replay.replayed.add(text)
            replay.compared.add(text)
    missing = sorted(text for text in shapes if text not in replay.replayed)

    print("compat: statements of the suite by kind (successful; failed on 18.16 too):")
    for k in sorted(replay.by_kind):
        print(f"  {k:14} {replay.by_kind[k]:8} statements {replay.shapes_by_kind[k]:5} shapes"
              f"   failed {failed.get(k, 0)}")
    print(f"compat: replayed on {replay.new}: " + ", ".join(
        f"{k} {n}" for k, n in sorted(replay.statements_replayed.items())))
    print(f"compat: shapes {len(shapes)}, run on {replay.new} {len(shapes) - len(missing)}, "
          f"of them compared on the same data {len(replay.compared & shapes)} (the rest: "
          f"DDL and writes whose tables are gone, run in order on empty tables), "
          f"rows compared {replay.rows_compared}, differences {len(replay.differences)}")
    for text in missing:
        print(f"compat: NOT REPLAYED ({kinds[text]}): {text[:300]}")
        for error in not_replayable.get(text, [])[:1]:
            print(f"    18.16 on the final data: {error[:200]}")
    for what, db, query, left, right in replay.differences:
        print(f"compat: DIFFERENCE {what} in {db}: {str(query)[:500]}")
        for side, value in (("18.16", left), (replay.new, right)):
            value = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            lines = value.splitlines()
            print(f"    {side}: " + " | ".join(lines[:SAMPLE_LINES])
                  + (f" … ({len(lines)} lines)" if len(lines) > SAMPLE_LINES else ""))

    # The statements of the cluster tests went to the shards and replicas. Those of the same shape
    # as a single server's are replayed above; the others (Distributed and Replicated tables,
    # the cluster checks) need a cluster, which an embedded ClickHouse is not: counted here.
    cluster_only = collections.Counter()
    cluster_databases = collections.defaultdict(set)
    for url in CLUSTER_URLS:
        try:
            for row in suite_statements(args.since, url):
                cluster_databases[url].add(row["quota_key"])
                text = shape(row["query"], row["quota_key"])
                if int(row["type"]) == 2 and text not in shapes:
                    cluster_only[text] += 1
        except (ServerError, OSError):
            print(f"compat: {url} does not answer: its statements are not counted")
    print(f"compat: cluster-only shapes (shards and replicas; need a cluster, not replayed): "
          f"{len(cluster_only)}, {sum(cluster_only.values())} statements")
    for text, count in sorted(cluster_only.items()):
        print(f"  {count:6}  {text[:160]}")

    if not args.keep:
        # The suite's databases (each named by the quota key of its statements).
        for db in sorted(existing & {row["quota_key"] for row in rows}):
            server(f"DROP DATABASE IF EXISTS {db}")
        for url, databases in cluster_databases.items():
            for db in sorted(databases):
                server(f"DROP DATABASE IF EXISTS {db}", url=url)
    print(f"compat: {time.monotonic() - started:.0f} s")
    return 1 if replay.differences or missing else 0



if __name__ == "__main__":
    sys.exit(main())
