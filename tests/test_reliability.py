"""Reliability: bad input, hostile names and crashes never stop a run or lose data.

Every test works on a real lake: the session's trained model, tokenized by the real job (Sail,
delta-rs), so bad lines meet tables that already hold documents and their constraints.
"""

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from infra.airflow_local import airflow_environment
from infra.lake import Lake, LakeError, utc_now
from infra.names import InvalidName
from infra import layout
from infra.runs import finish_run, start_run
from jobs import extract, tokenize
from jobs.checkpoints import CheckpointMismatch, weights_fingerprint
from schemas.tables import TABLES
from tests.fixtures import copy_lake

MAX_CHARS = 2_000
FUZZ_LINES = 12_000
FUZZ_FILE = "c4-train.00002-of-00009.json.gz"


def _good(rng, n):
    words = ["fact", "river", "town", "Varnholt", "citizen", "weather", "quiet", "born", "in", "the", "of"]
    return {
        "text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))),
        "url": f"https://fuzz.example/{n}",
        "timestamp": "2019-04-25T12:57:54Z",
    }


def _line(record) -> bytes:
    return json.dumps(record).encode()


def _bad_line_makers(earlier_url):
    """kind of bad line -> (expected reason kind, maker(rng, n, previous good url) -> raw bytes)."""

    def good(rng, n):
        return _good(rng, n)

    def field(name, value):
        return lambda rng, n, prev: _line({**good(rng, n), name: value})

    def without(name):
        return lambda rng, n, prev: _line({k: v for k, v in good(rng, n).items() if k != name})

    return {
        "truncated JSON": (
            "malformed JSON",
            lambda rng, n, prev: (lambda b: b[: rng.randint(1, len(b) - 2)])(_line(good(rng, n))),
        ),
        "deeply nested array": ("malformed JSON", lambda rng, n, prev: b"[" * 5_000 + b"]" * 5_000),
        "deeply nested field": (
            "malformed JSON",
            lambda rng, n, prev: (
                b'{"text": ' + b'{"a": ' * 1_500 + b"1" + b"}" * 1_500 + b', "url": "u", "timestamp": "t"}'
            ),
        ),
        "trailing garbage": ("malformed JSON", lambda rng, n, prev: _line(good(rng, n)) + b" trailing"),
        "invalid escape": (
            "malformed JSON",
            lambda rng, n, prev: b'{"text": "bad \\q escape", "url": "u", "timestamp": "t"}',
        ),
        "random bytes": (
            "not UTF-8",
            lambda rng, n, prev: b"\xff" + bytes(rng.randrange(256) for _ in range(200)).replace(b"\n", b" "),
        ),
        "latin-1 text": (
            "not UTF-8",
            lambda rng, n, prev: _line(good(rng, n)).replace(b'"text": "', b'"text": "caf\xe9 '),
        ),
        "lone surrogate in text": (
            "unencodable text",
            lambda rng, n, prev: _line(good(rng, n)).replace(b'"text": "', b'"text": "\\ud800'),
        ),
        "lone surrogate in url": (
            "unencodable text",
            lambda rng, n, prev: _line(good(rng, n)).replace(b'"url": "', b'"url": "\\udfff'),
        ),
        "text is a number": ("field 'text' is int, expected a string", field("text", 42)),
        "text is null": ("field 'text' is NoneType, expected a string", field("text", None)),
        "url is a list": ("field 'url' is list, expected a string", field("url", ["https://a", "https://b"])),
        "timestamp is an object": ("field 'timestamp' is dict, expected a string", field("timestamp", {"t": 1})),
        "missing text": ("missing field 'text'", without("text")),
        "missing url": ("missing field 'url'", without("url")),
        "missing timestamp": ("missing field 'timestamp'", without("timestamp")),
        "JSON array": ("JSON list, expected an object", lambda rng, n, prev: b'["text", "url"]'),
        "JSON string": ("JSON str, expected an object", lambda rng, n, prev: b'"just a string"'),
        "JSON null": ("JSON NoneType, expected an object", lambda rng, n, prev: b"null"),
        "blank line": ("blank line", lambda rng, n, prev: b" \t "),
        "empty line": ("blank line", lambda rng, n, prev: b""),
        "empty text": ("empty text", field("text", "")),
        "whitespace text": ("empty text", field("text", " \n\t ")),
        "empty url": ("empty url", field("url", "  ")),
        "huge text": ("document too large", field("text", "x" * (MAX_CHARS + 1))),
        "overlong line": (
            "document too large",
            lambda rng, n, prev: b'{"text": "' + b"y" * (8 * MAX_CHARS + 8192) + b'"}',
        ),
        "NUL in text": ("binary junk", field("text", "a\x00b")),
        "NUL in url": ("binary junk", field("url", "https://nul.example/\x00")),
        "url seen earlier in this partition": (
            "duplicate url",
            lambda rng, n, prev: _line({**good(rng, n), "url": prev}),
        ),
        "url of an indexed partition": (
            "duplicate url",
            lambda rng, n, prev: _line({**good(rng, n), "url": earlier_url}),
        ),
    }


def fuzzed_partition(path, rng, n_lines, earlier_url):
    """Writes n_lines raw lines, about a third of them bad; returns (expected reason kinds per
    line number (None for a document), the kinds of bad line written)."""
    makers = _bad_line_makers(earlier_url)
    kinds = sorted(makers)
    expected, previous_url, lines = {}, None, []
    for number in range(1, n_lines + 1):
        if previous_url is None or rng.random() < 0.65 or number <= len(kinds):
            record = _good(rng, number)
            raw, reason = _line(record), None
            previous_url = record["url"]
        else:
            kind = kinds[number % len(kinds)]
            reason, make = makers[kind]
            raw = make(rng, number, previous_url)
        assert b"\n" not in raw
        lines.append(raw)
        expected[number] = reason
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    return expected, kinds


@pytest.fixture(scope="module")
def fuzzed_lake(adam_run, tmp_path_factory):
    source, _ = adam_run
    lake_dir = copy_lake(source, tmp_path_factory.mktemp("reliability") / "lake")
    lake = Lake(lake_dir)
    first = tokenize.run(tokenize.TokenizeConfig(lake=str(lake_dir), max_chars=MAX_CHARS))
    before = lake.read("documents", columns=["doc_id", "partition", "line"])
    assert before.num_rows > 0 and first["quarantined"] == 0  # a real lake that already holds documents
    earlier_url = before["doc_id"][0].as_py()
    raw = lake_dir / "raw"
    expected, kinds = fuzzed_partition(raw / FUZZ_FILE, random.Random(14), FUZZ_LINES, earlier_url)
    with gzip.open(raw / "c4-train.00003-of-00009.json.gz", "wb"):
        pass  # an empty file
    (raw / "c4-train.00004-of-00009.json.gz").write_bytes(b"plain text, not gzip\n")
    whole = gzip.compress(b"\n".join(_line(_good(random.Random(5), f"t{i}")) for i in range(400)) + b"\n")
    (raw / "c4-train.00005-of-00009.json.gz").write_bytes(whole[: len(whole) // 2])  # cut short
    corrupt = bytearray(gzip.compress(b"\n".join(_line(_good(random.Random(6), f"c{i}")) for i in range(400)) + b"\n"))
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = bytes(64)
    (raw / "c4-train.00006-of-00009.json.gz").write_bytes(bytes(corrupt))
    result = tokenize.run(tokenize.TokenizeConfig(lake=str(lake_dir), max_chars=MAX_CHARS))
    return lake, before, expected, kinds, result


def _quarantined(lake, source):
    return lake.read("quarantine", filters=[("stage", "=", "tokenize"), ("source", "=", source)]).to_pylist()


def test_every_fuzzed_line_is_one_document_or_one_quarantine_row(fuzzed_lake):
    lake, before, expected, kinds, result = fuzzed_lake
    assert len(kinds) >= 25 and len(expected) >= 10_000
    documents = lake.read("documents", filters=[("source", "=", FUZZ_FILE)], columns=["line"])["line"].to_pylist()
    quarantined = _quarantined(lake, FUZZ_FILE)
    by_line = Counter(documents) + Counter(int(q["position"].rsplit(":", 1)[1]) for q in quarantined)
    assert len(documents) + len(quarantined) == FUZZ_LINES  # good + quarantined = lines
    assert set(by_line) == set(range(1, FUZZ_LINES + 1)) and set(by_line.values()) == {1}  # each line exactly once
    assert sorted(documents) == [n for n, reason in expected.items() if reason is None]
    found = {int(q["position"].rsplit(":", 1)[1]): q["reason"] for q in quarantined}
    wrong = {n: (expected[n], found[n]) for n in found if not found[n].startswith(expected[n])}
    assert not wrong, list(wrong.items())[:5]
    expected_kinds = Counter(tokenize.reason_counts(r for r in expected.values() if r is not None))
    assert Counter(tokenize.reason_counts(found.values())) == expected_kinds
    assert set(result["quarantined_by_reason"]) >= set(expected_kinds)
    print(
        f"\nfuzz: {FUZZ_LINES} lines, {len(documents)} documents, {len(quarantined)} quarantined: "
        f"{dict(sorted(expected_kinds.items()))}"
    )


def test_bad_files_are_reported_and_readable_lines_kept(fuzzed_lake):
    lake, *_ = fuzzed_lake
    empty, not_gzip = (
        _quarantined(lake, "c4-train.00003-of-00009.json.gz"),
        _quarantined(lake, "c4-train.00004-of-00009.json.gz"),
    )
    assert [q["reason"] for q in empty] == ["empty partition file: no lines"]
    assert len(not_gzip) == 1 and not_gzip[0]["reason"].startswith("unreadable file: after line 0")
    for source in ("c4-train.00005-of-00009.json.gz", "c4-train.00006-of-00009.json.gz"):  # cut short, corrupted
        rows = {int(q["position"].rsplit(":", 1)[1]): q["reason"] for q in _quarantined(lake, source)}
        kept = lake.read("documents", filters=[("source", "=", source)], columns=["line"])["line"].to_pylist()
        last = max(rows)
        assert rows[last].startswith("unreadable file") and last > 0  # where the damage was found
        assert Counter(kept) + Counter(list(rows)) == Counter(range(1, last + 1))  # every line read before it, once
        assert all(not reason.startswith("unreadable file") for line, reason in rows.items() if line != last)


def test_no_duplicate_keys_and_earlier_partitions_untouched(fuzzed_lake):
    lake, before, *_ = fuzzed_lake
    documents = lake.read("documents", columns=["doc_id"])["doc_id"].to_pylist()
    assert len(documents) == len(set(documents))
    tokens = lake.read("tokens", columns=["doc_id", "chunk"])
    keys = list(zip(tokens["doc_id"].to_pylist(), tokens["chunk"].to_pylist()))
    assert len(keys) == len(set(keys)) and set(tokens["doc_id"].to_pylist()) == set(documents)
    again = lake.read("documents", filters=[("partition", "in", [0, 1])], columns=["doc_id", "partition", "line"])
    assert sorted(again.to_pylist(), key=str) == sorted(before.to_pylist(), key=str)


SNAPSHOT_COLUMNS = {
    "documents": ["doc_id", "partition", "line", "text"],
    "tokens": ["doc_id", "chunk", "input_ids"],
    "quarantine": ["source", "position", "reason"],
}


def _snapshot(lake):
    return {
        table: sorted(map(str, lake.read(table, columns=names).to_pylist()))
        for table, names in SNAPSHOT_COLUMNS.items()
    }


def test_a_forced_rerun_gives_identical_tables(fuzzed_lake):
    lake = fuzzed_lake[0]
    first = _snapshot(lake)
    tokenize.run(tokenize.TokenizeConfig(lake=lake.root, max_chars=MAX_CHARS, force=True))
    assert _snapshot(lake) == first


@pytest.mark.parametrize("moment", ["runs", "documents", "tokens"])
def test_tokenize_killed_after_each_commit_then_rerun_gives_identical_tables(fuzzed_lake, moment):
    """kill -9 right after the run row, the documents or the tokens commit; the tables stay
    without duplicates, the run is marked failed later, and a rerun gives the same tables."""
    lake = fuzzed_lake[0]
    first, version = _snapshot(lake), lake.version(moment)
    child = subprocess.Popen(
        [sys.executable, "-m", "jobs", "tokenize", "--lake", lake.root, "--force"],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while lake.version(moment) == version and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert lake.version(moment) > version, f"killed before the {moment} commit"
    documents = lake.read("documents", columns=["doc_id"])["doc_id"].to_pylist()
    tokens = lake.read("tokens", columns=["doc_id", "chunk"])
    assert len(documents) == len(set(documents))
    assert tokens.num_rows == len(set(zip(tokens["doc_id"].to_pylist(), tokens["chunk"].to_pylist())))
    tokenize.run(tokenize.TokenizeConfig(lake=lake.root, max_chars=MAX_CHARS, force=True))
    assert _snapshot(lake) == first
    statuses = [r["status"] for r in lake.read("runs", filters=[("command", "=", "tokenize")]).to_pylist()]
    assert "running" not in statuses and statuses.count("failed") >= 1


# ------------------------------------------------------------------ names are identifiers
HOSTILE_NAMES = ["x' OR 1=1 --", "../../outside", "o'brien-set", "a/b", "x\\'; DROP TABLE runs; --"]
NAMED_ARGUMENTS = [  # (command and its other arguments, the flag that takes a name)
    (["score"], "--query-set"),
    (["score"], "--checkpoint-id"),
    (["score"], "--fingerprint"),
    (["fit-hessian"], "--query-set"),
    (["fit-hessian"], "--checkpoint-id"),
    (["fit-hessian"], "--fingerprint"),
    (["evaluate"], "--query-set"),
    (["evaluate"], "--checkpoint-id"),
    (["extract"], "--query-set"),
    (["index"], "--query-set"),
    (["index"], "--checkpoint-id"),
    (["index"], "--fingerprint"),
    (["trace", "--prompt", "p", "--target", " t"], "--query-set"),
    (["trace", "--prompt", "p", "--target", " t"], "--checkpoint-id"),
    (["register-queries"], "--name"),
    (["pipeline"], "--name"),
]


def _lake_state(lake, root):
    """Every table's version and every file under the lake's parent folder."""
    return (
        {table: lake.version(table) for table in TABLES},
        sorted(str(p.relative_to(root)) for p in root.rglob("*") if "_delta_log" not in p.parts),
    )


@pytest.mark.parametrize("command, flag", NAMED_ARGUMENTS, ids=[f"{c[0]} {f}" for c, f in NAMED_ARGUMENTS])
def test_hostile_names_are_refused_by_every_cli_argument_and_change_nothing(fuzzed_lake, command, flag, capsys):
    from jobs.__main__ import main

    lake = fuzzed_lake[0]
    parent = Path(lake.root).parent
    before = _lake_state(lake, parent)
    for name in HOSTILE_NAMES:
        with pytest.raises(SystemExit) as exit_status:
            main([*command, "--lake", lake.root, flag, name])
        assert exit_status.value.code == 2, name
        assert f"{name!r} is not a valid name: use 1-128 ASCII letters" in capsys.readouterr().err, name
    assert _lake_state(lake, parent) == before


def test_a_checkpoint_id_that_is_a_path_is_refused_before_anything_is_written(fuzzed_lake, adam_run, tmp_path):
    lake, source, summary = fuzzed_lake[0], *adam_run
    hostile = tmp_path / "ck"
    shutil.copytree(layout.checkpoint_path(source, summary["checkpoints"][-1]), hostile)
    manifest = json.loads((hostile / "manifest.json").read_text())
    (hostile / "manifest.json").write_text(json.dumps({**manifest, "checkpoint_id": "../../../escaped"}))
    before = _lake_state(lake, Path(lake.root).parent)
    with pytest.raises(InvalidName, match="checkpoint id in .* '../../../escaped' is not a valid name"):
        extract.run(extract.ExtractConfig(lake=lake.root, checkpoint=str(hostile), projection_k=4))
    assert _lake_state(lake, Path(lake.root).parent) == before


def test_the_score_dag_refuses_a_hostile_query_set_when_triggered(tmp_path):
    check = (
        "from airflow.dag_processing.dagbag import DagBag; import os, sys; "
        "param = DagBag(dag_folder=os.environ['AIRFLOW__CORE__DAGS_FOLDER']).dags['trackstar_score'].params"
        ".get_param('query_set')\nfor name in sys.argv[1:]:\n"
        "    try: param.resolve(name); print('accepted', repr(name))\n"
        "    except Exception as error: print('refused', repr(name), type(error).__name__)"
    )
    env = airflow_environment("lake", tmp_path / "airflow")
    out = subprocess.run(
        [sys.executable, "-c", check, "fact-world", *HOSTILE_NAMES], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    out = [line for line in out if line.startswith(("accepted", "refused"))]  # Airflow logs to stdout too
    assert out == ["accepted 'fact-world'"] + [f"refused {n!r} ParamValidationError" for n in HOSTILE_NAMES]


def test_quotes_in_slice_values_select_exactly_their_slice(spark, lake):
    """Values that are not names (sources, messages) are quoted for each engine: Spark reads 'a''b'
    as "ab" and backslash escapes; delta-rs reads '' as one quote."""
    tricky = ["o'brien-set", "obrien-set", "x' OR 1=1 --", "back\\slash", "back\\", "plain"]
    rows = [
        {
            "query_set": q,
            "checkpoint_id": "ck",
            "query_id": f"q{i}",
            "method": "trackstar",
            "rank": 1,
            "doc_id": "d",
            "chunk": 0,
            "score": 1.0,
            "run_id": "r0",
        }
        for i, q in enumerate(tricky)
    ]
    lake.append("proponents", pa.Table.from_pylist(rows, schema=TABLES["proponents"].arrow_schema))
    for i, query_set in enumerate(tricky):
        replacement = spark.createDataFrame([{**rows[i], "run_id": f"spark{i}"}])
        lake.spark_write(
            replacement,
            "proponents",
            replace_where={"query_set": query_set, "method": "trackstar", "checkpoint_id": "ck"},
        )
        stored = {r["query_set"]: r["run_id"] for r in lake.read("proponents").to_pylist()}
        assert len(stored) == len(tricky) and stored == {
            q: f"spark{j}" if j <= i else "r0" for j, q in enumerate(tricky)
        }
    for i, query_set in enumerate(tricky):  # delta-rs slices and updates
        lake.replace_slice(
            "proponents",
            pa.Table.from_pylist([{**rows[i], "run_id": f"rs{i}"}], schema=TABLES["proponents"].arrow_schema),
            query_set=query_set,
            method="trackstar",
            checkpoint_id="ck",
        )
    assert sorted(r["run_id"] for r in lake.read("proponents").to_pylist()) == sorted(
        f"rs{i}" for i in range(len(tricky))
    )
    run_id = start_run(lake, "score", {"query_set": "x' OR 1=1 --"})
    counts = {"error": 'InvalidName: query set "x\' OR 1=1 --" is not a valid name', "path": "C:\\lake\\'runs'"}
    finish_run(lake, run_id, "failed", counts)  # once corrupted the row: delta-rs pastes strings unescaped
    (row,) = lake.read("runs").to_pylist()
    assert row["status"] == "failed" and json.loads(row["counts_json"]) == counts and row["finished_at"] is not None


# ------------------------------------------------------------------ jobs sql is read-only
def test_sql_refuses_writing_statements_unless_allowed(fuzzed_lake, capsys):
    from jobs.__main__ import main

    lake = fuzzed_lake[0]
    before = (lake.version("documents"), lake.read("documents", columns=["doc_id"]).num_rows)
    for statement in (
        "DELETE FROM documents",
        "delete from documents where 1 = 1;",
        "/* tidy up */ DELETE FROM documents",
        "SELECT 1; DELETE FROM documents",
        "WITH gone AS (SELECT * FROM documents) INSERT INTO documents SELECT * FROM gone",
        "MERGE INTO documents d USING documents s ON d.doc_id = s.doc_id WHEN MATCHED THEN DELETE",
        "DROP TABLE documents",
        "UPDATE documents SET text = ''",
    ):
        with pytest.raises(SystemExit, match="jobs sql is read-only"):
            main(["sql", statement, "--lake", lake.root])
    assert (lake.version("documents"), lake.read("documents", columns=["doc_id"]).num_rows) == before
    main(["sql", "SELECT count(*) AS n FROM documents WHERE text <> 'DELETE FROM documents'", "--lake", lake.root])
    assert f"|{before[1]}" in capsys.readouterr().out.replace(" ", "")


# ------------------------------------------------------------------ runs end in a state
def test_a_writer_that_loses_a_commit_race_says_so(lake, monkeypatch):
    row = {
        "query_set": "qs",
        "checkpoint_id": "ck",
        "query_id": "q",
        "method": "trackstar",
        "rank": 1,
        "doc_id": "d",
        "chunk": 0,
        "score": 1.0,
        "run_id": "first",
    }
    schema = TABLES["proponents"].arrow_schema
    lake.replace_slice(
        "proponents", pa.Table.from_pylist([row], schema=schema), query_set="qs", method="trackstar", checkpoint_id="ck"
    )
    seen_by_loser = lake.open("proponents")  # the loser read the table, then the winner committed
    lake.replace_slice(
        "proponents",
        pa.Table.from_pylist([{**row, "run_id": "winner"}], schema=schema),
        query_set="qs",
        method="trackstar",
        checkpoint_id="ck",
    )
    monkeypatch.setattr(lake, "create", lambda table: seen_by_loser)
    with pytest.raises(LakeError, match=r"another run committed slice .*'query_set': 'qs'.* of table proponents first"):
        lake.replace_slice(
            "proponents",
            pa.Table.from_pylist([{**row, "run_id": "loser"}], schema=schema),
            query_set="qs",
            method="trackstar",
            checkpoint_id="ck",
        )
    assert [r["run_id"] for r in lake.read("proponents").to_pylist()] == ["winner"]


RUN_THEN = """
import sys, time
from infra.lake import Lake
from infra.runs import start_run
run_id = start_run(Lake(sys.argv[1]), "tokenize", {"partitions": [7]})
print(run_id, flush=True)
if sys.argv[2] == "raise":
    raise RuntimeError("the stage broke")
time.sleep(600)
"""


def test_a_run_that_raised_or_was_killed_ends_failed(lake, tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(RUN_THEN)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    raised = subprocess.run([sys.executable, str(script), lake.root, "raise"], env=env, capture_output=True, text=True)
    assert raised.returncode == 1 and "the stage broke" in raised.stderr
    killed = subprocess.Popen(
        [sys.executable, str(script), lake.root, "sleep"], env=env, stdout=subprocess.PIPE, text=True
    )
    killed_run = killed.stdout.readline().strip()
    status = {r["run_id"]: r for r in lake.read("runs").to_pylist()}
    assert status[killed_run]["status"] == "running"  # alive: a later run must leave it alone
    start_run(lake, "score", {})
    assert {r["run_id"]: r["status"] for r in lake.read("runs").to_pylist()}[killed_run] == "running"
    killed.kill()
    killed.wait()
    later = start_run(lake, "score", {})
    runs = {r["run_id"]: r for r in lake.read("runs").to_pylist()}
    raised_run = raised.stdout.strip()
    assert (
        runs[raised_run]["status"] == "failed" and "exited before the run finished" in runs[raised_run]["counts_json"]
    )
    assert runs[killed_run]["status"] == "failed" and runs[killed_run]["finished_at"] is not None
    assert f"process {killed.pid} on" in json.loads(runs[killed_run]["counts_json"])["error"]
    assert runs[later]["status"] == "running"


def test_a_killed_extract_driver_takes_its_deepspeed_ranks_down(fuzzed_lake):
    import psutil

    lake = fuzzed_lake[0]
    command = [
        sys.executable,
        "-m",
        "jobs",
        "extract",
        "--lake",
        lake.root,
        "--projection-k",
        "4",
        "--partitions",
        "1",
        "2",  # two partitions: a rank each (a node never starts more ranks than partitions to do)
        "--query-set",
        "",
        "--force",
    ]
    driver = subprocess.Popen(
        command, env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline, ranks = time.time() + 180, []
    while time.time() < deadline and len(ranks) < 2 and driver.poll() is None:
        time.sleep(0.5)
        ranks = [  # ranks that have their plan (they start while the driver still plans)
            p
            for p in psutil.Process(driver.pid).children(recursive=True)
            if "--plan" in p.cmdline()
            and "jobs.extract" in " ".join(p.cmdline())
            and "deepspeed" not in " ".join(p.cmdline())
            and os.path.exists(p.cmdline()[p.cmdline().index("--plan") + 1])
        ]
    assert len(ranks) == 2, "the ranks never started"
    tree = psutil.Process(driver.pid).children(recursive=True)  # the ranks
    driver.kill()  # the driver only: nothing is left to tell its children to stop
    driver.wait()
    gone, alive = psutil.wait_procs(tree, timeout=60)  # the ranks alone would work for minutes
    survivors = [" ".join(p.cmdline()[:6]) for p in alive]
    for process in alive:
        process.kill()
    assert survivors == [], f"{survivors} outlived the driver"
    run_id = start_run(lake, "score", {})
    extract_runs = [r for r in lake.read("runs", filters=[("command", "=", "extract")]).to_pylist()]
    assert extract_runs and all(r["status"] == "failed" for r in extract_runs)
    finish_run(lake, run_id, "succeeded")


def test_an_incomplete_checkpoint_is_refused_before_it_is_registered(fuzzed_lake, adam_run, tmp_path):
    from jobs.checkpoints import CheckpointError

    lake, (source, summary) = fuzzed_lake[0], adam_run
    incomplete = tmp_path / "incomplete"
    shutil.copytree(layout.checkpoint_path(source, summary["checkpoints"][-1]), incomplete)
    manifest = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "checkpoint_id": "incomplete-step6"}))
    (incomplete / "optimizer.pt").write_bytes(b"")  # a copy cut short: the file is there, empty
    before = lake.version("checkpoints"), lake.version("runs")
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing or empty: optimizer.pt"):
        extract.run(extract.ExtractConfig(lake=lake.root, checkpoint=str(incomplete), projection_k=4))
    assert (lake.version("checkpoints"), lake.version("runs")) == before


# ------------------------------------------------------------------ stored vectors, ties
def test_float16_overflow_is_refused_not_stored_as_inf():
    from schemas.vectors import VectorOverflow, decode_vectors, encode_vectors

    vectors = np.ones((5, 4), np.float32)
    vectors[[1, 3], 2] = [70_000.0, -1e6]  # beyond float16's ±65504, as large gradients are
    with pytest.raises(
        VectorOverflow, match=r"2 of 5 vectors hold values beyond float16's range \(largest \|x\| = 1e\+06\)"
    ):
        encode_vectors(vectors, "float16")
    cells, _ = encode_vectors(vectors, "bfloat16")  # float32's range: stored, finite
    assert np.isfinite(decode_vectors(cells, "bfloat16")).all()
    np.testing.assert_allclose(decode_vectors(cells, "bfloat16"), vectors, rtol=4e-3)
    cells, scales = encode_vectors(vectors, "int8")
    assert np.isfinite(decode_vectors(cells, "int8", scales)).all()
    assert extract.QUERY_DTYPE == "float32"  # queries are never rounded with the corpus's dtype


def _train_batches(vectors, doc_ids, order, size):
    from schemas.vectors import encode_vectors

    for start in range(0, len(order), size):
        rows = order[start : start + size]
        cells, _ = encode_vectors(vectors[rows], "float32")
        yield pa.RecordBatch.from_pydict(
            {
                "doc_id": [doc_ids[i] for i in rows],
                "chunk": pa.array([0] * len(rows), pa.int32()),
                "vector": cells,
                "dtype": ["float32"] * len(rows),
                "scale": pa.nulls(len(rows), pa.float32()),
            }
        )


def test_top_k_ranks_equal_scores_by_doc_and_chunk_whatever_the_batch_order():
    from jobs.score import score_batches

    rng = np.random.default_rng(9)
    vectors = np.repeat(rng.integers(-3, 4, size=(6, 8)), 4, axis=0).astype(np.float32)  # four-way exact ties
    doc_ids = [f"https://dup.example/{i:02d}" for i in rng.permutation(len(vectors))]
    queries = rng.integers(-3, 4, size=(3, 8)).astype(np.float32)
    expected = []
    for query_index, query in enumerate(queries):
        ranked = sorted((-float(query @ v), doc_ids[i], 0) for i, v in enumerate(vectors))[:5]
        expected += [(query_index, doc, chunk, -score) for score, doc, chunk in ranked]
    for seed, size in ((0, 24), (1, 5), (2, 3), (3, 7)):
        order = list(np.random.default_rng(seed).permutation(len(vectors)))
        batch = next(score_batches(_train_batches(vectors, doc_ids, order, size), queries, None, False, 5, 8))
        got = list(zip(*(batch.column(name).to_pylist() for name in ("query_index", "doc_id", "chunk", "score"))))
        assert got == expected, (seed, size)


# ------------------------------------------------------------------ the explorer never answers 500
@pytest.fixture(scope="module")
def explorer_lake(adam_run, tmp_path_factory):
    """A lake with registered queries and checkpoint and hand-written proponents for all but one query."""
    from jobs import register_queries
    from jobs.checkpoints import load_manifest

    source, summary = adam_run
    lake_dir = copy_lake(source, tmp_path_factory.mktemp("explorer") / "lake")
    lake = Lake(lake_dir)
    register_queries.run(str(lake_dir))
    checkpoint = layout.checkpoint_path(lake_dir, summary["checkpoints"][-1])
    manifest = load_manifest(checkpoint)
    extract.register_checkpoint(lake, manifest, weights_fingerprint(checkpoint), str(checkpoint), "test")
    queries = sorted(lake.read("queries").to_pylist(), key=lambda q: q["query_id"])
    rows = [
        {
            "query_set": q["query_set"],
            "checkpoint_id": manifest["checkpoint_id"],
            "query_id": q["query_id"],
            "method": method,
            "rank": rank,
            "doc_id": f"https://nowhere.example/{rank}",
            "chunk": 0,
            "score": 1.0 / rank,
            "run_id": "test",
        }
        for q in queries[1:]
        for method in ("trackstar", "bm25")
        for rank in (1, 2)
    ]
    lake.append("proponents", pa.Table.from_pylist(rows, schema=TABLES["proponents"].arrow_schema))
    return lake, checkpoint, queries


def test_the_explorer_answers_odd_requests_with_a_page_or_a_4xx(explorer_lake):
    from fastapi.testclient import TestClient

    from explorer import explore

    lake, _, queries = explorer_lake
    client = TestClient(explore.create_app(lake.root), base_url="http://127.0.0.1")
    unscored = queries[0]["query_id"]  # registered, never scored
    pages = {
        "/": 200,
        "/?relation=&bucket=&prediction=&q=": 200,
        "/?q=no-query-says-this": 200,
        "/?q=Zürich%20→%20東京": 200,
        f"/query/{unscored}": 200,
        f"/query/{unscored}?methods=&k=": 400,
        f"/query/{queries[1]['query_id']}?methods=": 200,
        f"/query/{queries[1]['query_id']}?methods=trackstar": 200,
        "/query/%C3%A9%E6%9D%B1": 404,
        "/query/%00": 404,
        "/?bucket=%F0%9F%98%80": 400,
        "/?checkpoint=%E2%80%8B": 400,
    }
    for path, status in pages.items():
        response = client.get(path)
        assert response.status_code == status, (path, response.status_code, response.text[:300])
    assert "no proponents" in client.get(f"/query/{unscored}").text
    assert "Metrics over these 0 queries" in client.get("/?q=no-query-says-this").text
    guarded = TestClient(explore.create_app(lake.root, token="s3cret"), base_url="http://127.0.0.1")
    for token in ("é", "\u200b", "s3cret\u00e9", ""):  # non-ASCII tokens crashed the comparison
        assert guarded.get("/", params={"token": token}).status_code == 401, token
    assert guarded.get("/", params={"token": "s3cret"}).status_code == 200
    assert explore.needs_token("0.0.0.0") and not explore.needs_token("127.0.0.1")


def test_trace_and_the_explorer_refuse_a_checkpoint_whose_weights_changed(explorer_lake):
    from fastapi.testclient import TestClient
    from safetensors.torch import load_file, save_file

    from explorer import explore
    from jobs.catalog import checkpoint_folder

    lake, checkpoint, _ = explorer_lake
    checkpoint_id = json.loads((checkpoint / "manifest.json").read_text())["checkpoint_id"]
    assert checkpoint_folder(lake, checkpoint_id) == checkpoint
    original = (checkpoint / "model.safetensors").read_bytes()
    weights = load_file(checkpoint / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    try:
        with pytest.raises(CheckpointMismatch, match="was indexed with weights .* re-extract it"):
            checkpoint_folder(lake, checkpoint_id)  # what TraceContext, evaluate and the explorer load through
        response = TestClient(explore.create_app(lake.root), base_url="http://127.0.0.1").get("/")
        assert response.status_code == 409 and "was indexed with weights" in response.text
    finally:
        (checkpoint / "model.safetensors").write_bytes(original)


# ------------------------------------------------------------------ maintenance cannot delete models
def test_checkpoint_folders_live_outside_every_table_folder(adam_run):

    source, summary = adam_run
    assert sorted(p.name for p in Path(layout.checkpoints_path(source)).iterdir()) == sorted(summary["checkpoints"])
    assert not (source / "checkpoints").exists()  # the `checkpoints` table's folder
    assert all(not (source / table).exists() or table == "model" for table in TABLES)


def test_maintenance_compacts_checkpoints_the_log_and_keeps_foreign_files(lake):
    from infra.maintenance import maintain_lake
    from dags.orchestrate import maintain_lake as maintenance_task
    from tests.test_lake import document_rows

    for partition in range(2):
        for _ in range(3):  # small files, as nightly appends make
            lake.replace_slice("documents", document_rows(partition, 4), partition=partition)
    for _ in range(3):
        lake.append("documents", document_rows(2, 3))  # three small files in one partition
    before = sorted(lake.read("documents").to_pylist(), key=str)
    old_version = lake.version("documents")
    lake.append(
        "checkpoints",
        pa.table(
            {
                "checkpoint_id": ["ck1"],
                "step": [4],
                "path": ["/ck1"],
                "optimizer": ["adam"],
                "learning_rate": [1e-3],
                "tokens_seen": [100],
                "model_fingerprint": ["m"],
                "registered_at": [utc_now()],
                "run_id": ["r1"],
            }
        ),
    )
    model = Path(lake.path("checkpoints")) / "gpt2-old-layout-step000006"  # a model folder where lakes kept them
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")

    results = maintain_lake(lake)
    documents = results["documents"]
    assert documents["files_removed"] >= 2 and documents["files_added"] >= 1 and documents["version"] > old_version
    assert documents["vacuumed"] == 0  # nothing is older than the retention yet: time travel still works
    assert sorted(lake.read("documents").to_pylist(), key=str) == before
    assert lake.read("documents", version=1).num_rows == 4  # the first write, files since compacted
    assert list((Path(lake.path("documents")) / "_delta_log").glob("*.checkpoint.parquet"))
    assert results["checkpoints"]["not_vacuumed_foreign_files"] == [
        "gpt2-old-layout-step000006/config.json",
        "gpt2-old-layout-step000006/model.safetensors",
    ]
    assert (model / "model.safetensors").read_bytes() == b"weights"
    assert set(results) == {"documents", "checkpoints"} and callable(maintenance_task)


def test_maintenance_vacuums_what_killed_writers_left_once_older_than_the_retention(lake):
    """A writer killed before its commit leaves data files the log never named, and one killed
    mid-file a half-written `<file>.parquet#1`: neither blocks the vacuum, both go once older than
    the retention, and younger ones (a write still running) stay."""
    import os
    import time

    from infra.maintenance import foreign_files, maintain_table
    from tests.test_lake import gradient_rows

    lake.replace_slice_batches("train_gradients", iter([gradient_rows("ck1", 0, 4)]), checkpoint_id="ck1", partition=0)
    folder = Path(lake.path("train_gradients")) / "checkpoint_id=ck1" / "partition=0"
    left = {
        name: folder / name
        for name in ("part-old.snappy.parquet", "part-old2.snappy.parquet#1", "part-new.snappy.parquet#1")
    }
    eight_days_ago = time.time() - 8 * 86400
    for name, path in left.items():
        path.write_bytes(b"x" * 1000)
        if "old" in name:
            os.utime(path, (eight_days_ago, eight_days_ago))
    assert foreign_files(lake, "train_gradients") == []
    result = maintain_table(lake, "train_gradients")
    assert result["vacuumed"] == 2 and result["not_vacuumed_foreign_files"] == []
    assert not left["part-old.snappy.parquet"].exists() and not left["part-old2.snappy.parquet#1"].exists()
    assert left["part-new.snappy.parquet#1"].exists()
    assert lake.read("train_gradients").num_rows == 4


def _fingerprints_per_file(lake: Lake, table: str) -> list[tuple]:
    """Per data file of the table, its fingerprints as the Delta log's statistics tell them."""
    actions = pa.table(lake.open(table).get_add_actions(flatten=True)).to_pylist()
    return sorted((a["min.fingerprint"], a["max.fingerprint"]) for a in actions)


def test_maintenance_keeps_each_fingerprint_in_files_of_its_own_and_the_streaming_writer_replaces_one_after(lake):
    """maintain_lake compacts the vector tables (train_gradients, query_gradients, trackstar_index)
    without mixing fingerprints: a file mixing two (as delta-rs writes them) is split, one
    fingerprint's small files are merged, and every file then holds one fingerprint, so a read of
    one reads one file. The rows do not change, the commit says so (dataChange false), and a second
    run finds nothing to do. A later re-extraction of one fingerprint replaces only its rows."""
    from infra.maintenance import maintain_lake
    from tests.test_lake import gradient_rows

    assert all(TABLES[name].files_per_slice == ("fingerprint",) for name in ("train_gradients", "query_gradients"))
    assert TABLES["trackstar_index"].files_per_slice == ("fingerprint",)
    mixed = pa.concat_tables([gradient_rows("ck1", 0, 3, fingerprint=f) for f in ("fp1", "fp2")])
    lake.replace_slice("train_gradients", mixed, checkpoint_id="ck1", partition=0)  # delta-rs: one file, both
    for first in (0, 10):  # two small files of a third fingerprint, as two appends leave them
        lake.append("train_gradients", gradient_rows("ck1", 0, 2, first_chunk=first, fingerprint="fp3"))
    lake.replace_slice_batches("train_gradients", iter([gradient_rows("ck1", 1, 2)]), checkpoint_id="ck1", partition=1)
    assert _fingerprints_per_file(lake, "train_gradients") == [
        ("fp", "fp"),
        ("fp1", "fp2"),
        ("fp3", "fp3"),
        ("fp3", "fp3"),
    ]
    order = [("fingerprint", "ascending"), ("partition", "ascending"), ("chunk", "ascending")]
    before, version = lake.read("train_gradients").sort_by(order), lake.version("train_gradients")

    result = maintain_lake(lake)["train_gradients"]
    assert (result["files_removed"], result["files_added"]) == (3, 3)  # partition 1's one file is left alone
    assert _fingerprints_per_file(lake, "train_gradients") == [(f, f) for f in ("fp", "fp1", "fp2", "fp3")]
    assert lake.read("train_gradients").sort_by(order).equals(before)
    commit = (Path(lake.path("train_gradients")) / "_delta_log" / f"{version + 1:020d}.json").read_text()
    actions = [json.loads(line) for line in commit.splitlines()]
    assert {a["add"]["dataChange"] for a in actions if "add" in a} == {False}
    assert {a["remove"]["dataChange"] for a in actions if "remove" in a} == {False}
    fp2 = (
        lake.open("train_gradients").to_pyarrow_dataset().get_fragments(filter=pa.compute.field("fingerprint") == "fp2")
    )
    assert len([f for f in fp2 if f.count_rows(filter=pa.compute.field("fingerprint") == "fp2")]) == 1
    again = maintain_lake(lake)["train_gradients"]
    assert (again["files_removed"], again["files_added"], again["partitions_left_for_next_run"]) == (0, 0, 0)

    rerun = gradient_rows("ck1", 0, 2, run_id="r2", fingerprint="fp2")
    lake.replace_slice_batches("train_gradients", iter([rerun]), checkpoint_id="ck1", partition=0, fingerprint="fp2")
    rows = lake.read("train_gradients", columns=["fingerprint", "run_id"]).to_pylist()
    assert Counter((r["fingerprint"], r["run_id"]) for r in rows) == {
        ("fp", "r1"): 2,
        ("fp1", "r1"): 3,
        ("fp2", "r2"): 2,
        ("fp3", "r1"): 4,
    }


def test_maintenance_does_not_rewrite_a_file_whose_vectors_fail_their_checksum(lake):
    """A corrupted vector in a file compaction would rewrite: the compaction stops naming the file
    and commits nothing (rewriting it would give the bad bytes a fresh Parquet CRC)."""
    from infra.maintenance import maintain_table
    from schemas.vectors import vector_checksums
    from tests.test_lake import gradient_rows

    for first in (0, 10):  # two small files of one fingerprint: compaction merges them
        lake.append("train_gradients", gradient_rows("ck1", 0, 2, first_chunk=first))
    rows = gradient_rows("ck1", 0, 2, first_chunk=20)
    cells = rows["vector"].to_pylist()
    cells[0] = bytes([cells[0][0] ^ 1]) + cells[0][1:]  # one bit flipped after the checksum was taken
    rows = rows.append_column("checksum", vector_checksums(rows["vector"], rows["scale"]))
    lake.append("train_gradients", rows.set_column(rows.schema.get_field_index("vector"), "vector", pa.array(cells)))
    version = lake.version("train_gradients")
    with pytest.raises(LakeError, match=r"table train_gradients, file .*\.parquet: not compacted.*checksum"):
        maintain_table(lake, "train_gradients")
    assert lake.version("train_gradients") == version


def test_a_compaction_racing_a_re_extraction_commits_nothing_and_the_new_rows_stand(lake, monkeypatch):
    """A re-extraction of a fingerprint commits while the maintenance is rewriting the partition's
    files: the compaction's commit would remove files that are gone and re-add the old rows, so it
    is dropped (the partition counted as skipped, its files deleted) and the slice holds exactly the
    re-extraction's rows, once. The race is made certain by committing the other write from inside
    the compaction, just before its commit."""
    from infra.slice_files import SliceFiles
    from tests.test_lake import gradient_rows

    mixed = pa.concat_tables([gradient_rows("ck1", 0, 3, fingerprint=f) for f in ("fp1", "fp2")])
    lake.replace_slice("train_gradients", mixed, checkpoint_id="ck1", partition=0)  # one file, both: to be split
    finish = SliceFiles.finish

    def finish_after_another_commit(self, data_change=True):
        if not data_change:  # the compaction's files, written and not yet committed
            rerun = gradient_rows("ck1", 0, 2, run_id="r2", fingerprint="fp2")
            lake.replace_slice_batches(
                "train_gradients", iter([rerun]), checkpoint_id="ck1", partition=0, fingerprint="fp2"
            )
        return finish(self, data_change)

    monkeypatch.setattr(SliceFiles, "finish", finish_after_another_commit)
    files_before = set(Path(lake.path("train_gradients")).rglob("*.parquet"))
    assert lake.optimize("train_gradients") == {"numFilesRemoved": 0, "numFilesAdded": 0, "partitionsSkipped": 1}
    rows = lake.read("train_gradients", columns=["fingerprint", "run_id"]).to_pylist()
    assert Counter((r["fingerprint"], r["run_id"]) for r in rows) == {("fp1", "r1"): 3, ("fp2", "r2"): 2}
    written = set(Path(lake.path("train_gradients")).rglob("*.parquet")) - files_before
    assert len(written) == 2  # the re-extraction's two files (fp2, and fp1 carried over); the compaction's are gone
