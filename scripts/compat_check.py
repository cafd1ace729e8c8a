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
4. The stack's cluster servers (shards, replicas) got statements of their own: Distributed
   and Replicated tables, the layout checks. Each server is replayed the same way in a chdb of
   its own (a child process: chdb is one engine per process) configured as that server: its
   clusters (`remote_servers`, so `is_local` says the same), its macros, its native port and,
   for a replica, the stack's ZooKeeper under a root of its own. Its own databases are
   replayed in full; of its reads and writes, those of a shape the main server lacks.
   What an embedded ClickHouse cannot run (no interserver endpoint: its replicas stay
   read-only; no `system.zookeeper`) is listed as such with the reason, never skipped silently.
5. Print statements by kind, shapes replayed, rows compared and every difference; exit 1 on
   a difference or on a shape nothing replayed. `--keep` leaves the databases; otherwise they
   are dropped at the end.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

URL = os.environ.get("TOPK_CLICKHOUSE_URL", "http://127.0.0.1:8123")
# The stack's cluster shards and replicas: each replayed in a chdb of its own (below).
CLUSTER_URLS = [u for u in (
    os.environ.get("TOPK_TEST_CLICKHOUSE_SHARD_URLS", "http://127.0.0.1:8131,http://127.0.0.1:8132")
    + "," + os.environ.get("TOPK_TEST_CLICKHOUSE_REPLICA_URLS",
                           "http://127.0.0.1:8141,http://127.0.0.1:8142")).split(",") if u]
# Settings the stack's profile sets on every statement: not the client's.
PROFILE_SETTINGS = {"log_queries", "max_memory_usage", "load_balancing"}
ZOOKEEPER = "127.0.0.1:" + os.environ.get("TOPK_STACK_ZOOKEEPER_PORT", "2181")
ZKCLI = "/usr/share/zookeeper/bin/zkCli.sh"  # Debian's zookeeper, which scripts/stack installs
# What an embedded ClickHouse (clickhouse-local) cannot do, by the error it gives.
EMBEDDED_LIMITS = {
    "TABLE_IS_READ_ONLY": "a Replicated table in an embedded ClickHouse stays read-only (it has "
                          "no interserver endpoint to announce to the other replicas)",
    "system.zookeeper": "an embedded ClickHouse has no system.zookeeper",
    # Its Distributed tables reach the other shards on the stack's 18.16 servers, whose native
    # protocol refuses every setting 18.16 does not know, and a 26.9 initiator always sends
    # some (`dialect`): 18.16 cannot be a shard of a 26.9 cluster, and chdb cannot be a shard.
    "Unknown setting": "its Distributed table's other shard is the stack's 18.16 server, which "
                       "refuses a 26.9 initiator's settings (an embedded ClickHouse cannot "
                       "serve as a 26.9 shard)",
}
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
        self.limits = {}                            # shape -> what the embedded engine lacks
        self.readonly = set()                       # (database, table) read-only in chdb
        self.out_of_reach = {}                      # (database, table) -> why (readonly too)
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

    def limited(self, text, error):
        """Whether the error is one an embedded ClickHouse gives for what it lacks (noted)."""
        for sign, reason in EMBEDDED_LIMITS.items():
            if sign in str(error):
                self.limits.setdefault(text, reason)
                return True
        return False

    def out_of_reach_in(self, db, sql, readonly=True):
        """Why a statement cannot run here (it names a table out of reach), or None. A read-only
        replica counts in a string too (its columns in system.columns are not 18.16's: its
        ALTERs could not run); a Distributed table only where the statement uses it."""
        code = re.sub(r"'(?:[^'\\]|\\.)*'", "''", sql)
        return next((why for (d, t), why in self.out_of_reach.items()
                     if d == db and (readonly or (d, t) not in self.readonly) and re.search(rf"\b{t}\b",
                                              sql if (d, t) in self.readonly else code)), None)

    def find_out_of_reach(self, db):
        """The tables of `db` chdb holds but cannot use as 18.16 does: the read-only replicas,
        the Distributed tables whose shards it cannot query."""
        self.readonly |= {tuple(line.split("\t")) for line in self.chdb(
            "SELECT database, table FROM system.replicas WHERE is_readonly").decode().splitlines()}
        for key in self.readonly:
            self.out_of_reach.setdefault(key, EMBEDDED_LIMITS["TABLE_IS_READ_ONLY"])
        for (table,) in [line.split("\t") for line in self.chdb(
                f"SELECT name FROM system.tables WHERE database = '{db}' "
                f"AND engine = 'Distributed'").decode().splitlines()]:
            try:
                self.chdb(f"SELECT count() FROM {db}.{table}")
            except Exception as error:  # noqa: BLE001
                why = next((r for sign, r in EMBEDDED_LIMITS.items() if sign in str(error)),
                           None)
                if why is None:
                    raise
                self.out_of_reach[(db, table)] = why

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
            # Not of the read-only replicas: their RENAMEs and DROPs run, their ALTERs fail below.
            why = self.out_of_reach_in(db, sql, readonly=False)
            if why:  # an insert through a Distributed table: half of it would land here
                self.limits.setdefault(text, why)
                continue
            if self.empty_source_setting and re.search(r"\bREPLACE PARTITION\b", sql, re.I):
                sql += " SETTINGS allow_replace_partition_from_empty_source = 1"
            try:
                self.chdb(sql)
            except Exception as error:  # noqa: BLE001 (chdb raises its own errors)
                self.find_out_of_reach(db)
                why = self.out_of_reach_in(db, sql)
                if why:  # e.g. an ALTER of a read-only replica, or of a column it did not add
                    self.limits.setdefault(text, why)
                elif not self.limited(text, error):
                    self.differ(f"schema statement fails on {self.new}", db, query,
                                "ok on 18.16", str(error))
                continue
            if re.match(r"\s*CREATE DATABASE", sql, re.I):
                self.chdb(f"USE {db}")  # again, after a test dropped its database
            if re.search(r"\bENGINE\s*=\s*(Replicated|Distributed)", sql):
                self.find_out_of_reach(db)
            self.replayed.add(text)
            self.statements_replayed["schema"] += 1
        self.find_out_of_reach(db)

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
            if (db, table) in self.readonly:
                continue  # its ALTERs could not run (a read-only replica): noted as a limit
            left = [(n, t) for n, t, _ in self.columns(db, table)]
            right = [tuple(line.split("\t")) for line in self.chdb(
                f"SELECT name, type FROM system.columns WHERE database = '{db}' "
                f"AND table = '{table}' ORDER BY position").decode().splitlines()]
            if left != right:
                self.differ("columns", db, table, left, right)
        return ours

    def copy_rows(self, db, tables):
        for table, engine in tables:
            if "MergeTree" not in engine or (db, table) in self.readonly:
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
            if "MergeTree" not in engine or (db, table) in self.readonly:
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
        why = self.out_of_reach_in(db, sql)
        if why:  # e.g. a read-only replica here, without the rows or columns 18.16's has
            self.limits.setdefault(text, why)
            return None
        clauses = ", ".join(f"{k} = {v!r}" if not v.isdigit() else f"{k} = {v}"
                            for k, v in settings.items())
        try:
            right = self.chdb(sql + (f" SETTINGS {clauses}" if clauses and
                                     " SETTINGS " not in sql.upper() else ""))
        except Exception as error:  # noqa: BLE001
            if not self.limited(text, error):
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

    def write(self, db, text, kind_, query, distributed=()):
        sql = strip_format(query)
        why = self.out_of_reach_in(db, sql)
        if why:
            self.limits.setdefault(text, why)
            return None
        target = re.match(r"\s*INSERT\s+INTO\s+`?(\w+)", sql, re.I)
        # An insert through a Distributed table: sent to the shards before it returns, on both
        # sides (18.16's default sends later, in the background, while rows are compared). The
        # other shards are the stack's 18.16 servers, for both engines' Distributed tables.
        sync = target is not None and target.group(1) in distributed
        try:
            server(sql, database=db, settings={"insert_distributed_sync": "1"} if sync else None)
        except ServerError as error:
            return str(error)
        if kind_ == "mutation":
            wait_for_mutations(db)
        try:
            self.chdb(sql + (" SETTINGS mutations_sync = 2" if kind_ == "mutation" else
                             " SETTINGS insert_distributed_sync = 1" if sync else ""))
        except Exception as error:  # noqa: BLE001
            if not self.limited(text, error):
                self.differ(f"{kind_} fails on {self.new}", db, query, "ok on 18.16",
                            str(error))
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


STACK_DIR = os.environ.get("TOPK_STACK_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", ".stack")


def server_config(url, zk_root):
    """A chdb config that makes it the server at `url` as far as statements can tell: the
    clusters, macros, native port (so `is_local` marks the same replica) and ZooKeeper of the
    stack's config of that server (found by its HTTP port), ZooKeeper under `zk_root`."""
    port = urllib.parse.urlparse(url).port
    for name in sorted(os.listdir(STACK_DIR)):
        path = os.path.join(STACK_DIR, name, "config.xml")
        if not os.path.isfile(path):
            continue
        root = ET.parse(path).getroot()
        if root.findtext("http_port") != str(port):
            continue
        config = ET.Element("clickhouse")
        for tag in ("tcp_port", "remote_servers", "macros", "zookeeper", "timezone"):
            element = root.find(tag)
            if element is not None:
                config.append(element)
        zookeeper = config.find("zookeeper")
        if zookeeper is not None:
            ET.SubElement(zookeeper, "root").text = zk_root
        return ET.tostring(config, encoding="unicode"), zookeeper is not None
    raise SystemExit(f"compat: no config of the server at {url} under {STACK_DIR}")


def zookeeper_cli(*command):
    subprocess.run([ZKCLI, "-server", ZOOKEEPER, *command], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def replay_cluster_server(url, args, main_shapes, workdir):
    """Replays the server at `url` in a child process (chdb is one engine per process) configured
    as that server; its report."""
    zk_root = f"/topk-compat/{os.getpid()}-{urllib.parse.urlparse(url).port}"
    config, zookeeper = server_config(url, zk_root)
    base = os.path.join(workdir, str(urllib.parse.urlparse(url).port))
    with open(base + ".xml", "w") as f:
        f.write(config)
    with open(base + ".shapes.json", "w") as f:
        json.dump(sorted(main_shapes), f)
    if zookeeper:  # its Replicated tables register there, apart from the 18.16 replicas'
        for node in ("/topk-compat", zk_root):
            subprocess.run([ZKCLI, "-server", ZOOKEEPER, "create", node],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--keep",
                        "--since", str(args.since), "--server", url, "--config", base + ".xml",
                        "--main-shapes", base + ".shapes.json", "--report", base + ".json",
                        "--session", base + ".chdb"], check=True)
    finally:
        if zookeeper:
            zookeeper_cli("deleteall", zk_root)
    with open(base + ".json") as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the test databases")
    parser.add_argument("--session", default=None, help="chdb data directory")
    parser.add_argument("--since", type=int, default=0,
                        help="only statements from this Unix time on (the suite's start)")
    # A cluster server's replay (a child of the main one).
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--main-shapes", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global URL
    URL = args.server or URL

    from chdb import __version__ as chdb_version  # noqa: E402 (installed by scripts/compat)
    from chdb.session import Session

    started = time.monotonic()
    session_dir = args.session or tempfile.mkdtemp(prefix="topk-compat-")
    session = Session(session_dir + (f"?config-file={args.config}" if args.config else ""))
    replay = Replay(session)
    old = server("SELECT version()").decode().strip()
    new = session.query("SELECT version()", "TSV").bytes().decode().strip()
    if not args.server:
        print(f"compat: ClickHouse {old} (server) against {new} (chdb {chdb_version})")
    # A cluster server replays the shapes the main server has not (its schema in full).
    main_shapes = set()
    if args.main_shapes:
        with open(args.main_shapes) as f:
            main_shapes = set(json.load(f))

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
        if text not in main_shapes:
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
              for text in [shape(row["query"], row["quota_key"])]} - main_shapes
    for text in shapes:
        replay.shapes_by_kind[kinds[text]] += 1

    # Few, small databases holding every shape: the smallest first, each taken only when it
    # holds a shape not yet held.
    chosen, held = [], set()
    for db in sorted({db for text in shapes for db in instances[text]},
                     key=lambda db: (sizes.get(db, 0), db)):
        mine = {text for text in shapes if db in instances[text]}
        if mine - held:
            chosen.append(db)
            held |= mine
    where = f" on {URL}" if args.server else ""
    print(f"compat{where}: {len(rows)} statements of the suite in {len(sizes)} databases kept; "
          f"replaying {len(chosen)} of them ({sum(sizes.get(db, 0) for db in chosen)} rows)")

    server("SYSTEM STOP MERGES")
    wait_for_merges()
    not_replayable = collections.defaultdict(list)
    try:
        for db in chosen:
            replay.schema(db, schema[db])
            tables = replay.compare_schema(db)
            distributed = {table for table, engine in tables if engine == "Distributed"}
            replay.copy_rows(db, tables)
            replay.compare_tables(db, tables, logical=False)
            replay.compare_tables(db, tables, logical=True)
            picks = [(text, query, settings) for text in shapes
                     for query, settings in instances[text].get(db, [])[:INSTANCES_PER_SHAPE]]
            for text, query, settings in picks:
                if kinds[text] in ("select", "metadata"):
                    error = replay.read(db, text, query, settings)
                    if error:
                        not_replayable[text].append(error)
            for text, query, _ in picks:
                if kinds[text] in ("insert select", "mutation", "partition", "optimize",
                                   "system"):
                    error = replay.write(db, text, kinds[text], query, distributed)
                    if error and kinds[text] != "partition":
                        not_replayable[text].append(error)
            replay.compare_tables(db, tables, logical=True)
            print(f"compat{where}: {db}: {len(tables)} tables, {sizes.get(db, 0)} rows, "
                  f"{len(picks)} statements")
    finally:
        server("SYSTEM START MERGES")

    # Inserts with data are replayed by the copy: every row they wrote is in chdb and compared.
    for text in shapes:
        if kinds[text] == "insert data" and any(db in chosen for db in instances[text]):
            replay.replayed.add(text)
            replay.compared.add(text)
    if args.report:
        with open(args.report, "w") as f:
            json.dump({
                "shapes": {text: kinds[text] for text in shapes},
                "by_kind": replay.by_kind, "failed": failed,
                "replayed": sorted(replay.replayed & shapes),
                "compared": sorted(replay.compared & shapes),
                "limits": {t: r for t, r in replay.limits.items()
                           if t in shapes and t not in replay.replayed},
                "statements_replayed": replay.statements_replayed,
                "rows_compared": replay.rows_compared,
                "differences": [(f"{w} (on {URL})", d, str(q), l.decode(errors="replace") if
                                 isinstance(l, bytes) else str(l),
                                 r.decode(errors="replace") if isinstance(r, bytes) else str(r))
                                for w, d, q, l, r in replay.differences],
                "not_replayable": {t: e[:1] for t, e in not_replayable.items()},
                "databases": sorted({row["quota_key"] for row in rows}),
            }, f)
        # Out without the engine's shutdown: with Replicated and Distributed tables it waits
        # minutes on ZooKeeper and its send queues, and its data directory is thrown away.
        sys.stdout.flush()
        os._exit(0)

    # The cluster servers: each replayed as itself, of its shapes those the main server lacks.
    main_shapes = set(shapes)
    cluster_databases = {}
    limits = {}
    with tempfile.TemporaryDirectory(prefix="topk-compat-cluster-") as workdir:
        for url in CLUSTER_URLS:
            try:
                server("SELECT 1", url=url)
            except (ServerError, OSError):
                print(f"compat: {url} does not answer: its statements are not replayed")
                continue
            report = replay_cluster_server(url, args, shapes, workdir)
            cluster_databases[url] = report["databases"]
            for text, k in report["shapes"].items():
                kinds[text] = k
                if text not in shapes:
                    shapes.add(text)
                    replay.shapes_by_kind[k] += 1
            for k, n in report["by_kind"].items():
                replay.by_kind[k] += n
            for k, n in report["failed"].items():
                failed[k] += n
            replay.replayed |= set(report["replayed"])
            replay.compared |= set(report["compared"])
            limits.update(report["limits"])
            for k, n in report["statements_replayed"].items():
                replay.statements_replayed[k] += n
            replay.rows_compared += report["rows_compared"]
            replay.differences += [tuple(d) for d in report["differences"]]
            for text, errors in report["not_replayable"].items():
                not_replayable[text] += errors
    limited = sorted(text for text in shapes if text in limits and text not in replay.replayed)
    missing = sorted(text for text in shapes if text not in replay.replayed and
                     text not in limits)

    print("compat: statements of the suite by kind (successful; failed on 18.16 too):")
    for k in sorted(replay.by_kind):
        print(f"  {k:14} {replay.by_kind[k]:8} statements {replay.shapes_by_kind[k]:5} shapes"
              f"   failed {failed.get(k, 0)}")
    print(f"compat: replayed on {replay.new}: " + ", ".join(
        f"{k} {n}" for k, n in sorted(replay.statements_replayed.items())))
    cluster_only = len(shapes - main_shapes)
    print(f"compat: shapes {len(shapes)} ({cluster_only} only on the cluster servers), run on "
          f"{replay.new} {len(shapes) - len(missing) - len(limited)}, of them compared on the "
          f"same data {len(replay.compared & shapes)} (the rest: DDL and writes whose tables "
          f"are gone, run in order on empty tables), rows compared {replay.rows_compared}, "
          f"differences {len(replay.differences)}")
    print("compat: the cluster servers' own shapes:")
    for text in sorted(shapes - main_shapes):
        state = ("compared" if text in replay.compared else "run" if text in replay.replayed
                 else "embedded limit" if text in limits else "NOT REPLAYED")
        print(f"  {kinds[text]:13} {state:14} {text[:150]}")
    for text in limited:
        print(f"compat: NOT RUNNABLE EMBEDDED ({kinds[text]}): {text[:200]}")
        print(f"    because {limits[text]}")
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

    if not args.keep:
        # The suite's databases (each named by the quota key of its statements).
        for db in sorted(existing & {row["quota_key"] for row in rows}):
            server(f"DROP DATABASE IF EXISTS {db}")
        for url, databases in cluster_databases.items():
            for db in databases:
                server(f"DROP DATABASE IF EXISTS {db}", url=url)
    print(f"compat: {time.monotonic() - started:.0f} s")
    return 1 if replay.differences or missing else 0


if __name__ == "__main__":
    sys.exit(main())
