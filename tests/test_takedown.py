"""`jobs takedown` on a real indexed lake (tests/indexed_lake.py): three documents filed through the
CLI's queue and carried out by the maintenance DAG's task leave no row in any table; R_train equals
the autocorrelation of the remaining stored vectors; proponents equal brute-force scoring with the
refitted matrices; the takedowns table says what happened; a url that comes back is quarantined."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from gradient_kernels.hessian import Autocorrelation
from gradient_kernels.scoring import Preconditioner, prepare
from infra.lake import Lake
from infra.matrices import load_matrices, load_metadata
from infra import layout
from jobs import catalog, score, takedown, tokenize
from infra.layout import TRAIN
from infra.row_deletes import delete_rows
from jobs.autocorrelation import correct_partition_sums
from schemas.tables import TABLES
from schemas.vectors import decode_rows, encode_vectors, vector_checksums
from tests.fixtures import copy_lake
from tests.indexed_lake import METHODS, QUOTED_URL, TOP_K, built_indexed_lake, write_raw_partition  # noqa: F401

REASON = 'court order 7: it\'s "private"'


def _proponents(lake):
    rows = lake.read("proponents", columns=["checkpoint_id", "method", "query_id", "rank", "doc_id", "chunk", "score"])
    return sorted(zip(*(rows[c].to_pylist() for c in rows.column_names)))


def _counts(lake, urls):
    return {table: takedown.rows_of(lake, table, urls).num_rows for table in takedown.DOC_TABLES}


def _r_train(lake, checkpoint_id, fingerprint):
    blocks, row = catalog.load_preconditioner(lake, checkpoint_id, "fact-world", fingerprint, "r_train")
    return blocks, row["n_samples"]


def _stored_vectors(lake, checkpoint_id, fingerprint):
    rows = lake.read(
        "train_gradients", filters=[("checkpoint_id", "=", checkpoint_id), ("fingerprint", "=", fingerprint)]
    )
    return rows, decode_rows(rows)


@pytest.fixture(scope="module")
def taken(indexed_lake, tmp_path_factory):
    """The indexed lake copied, three urls filed with `jobs takedown --queue` and carried out by the
    maintenance DAG's task; what the lake held before."""
    from dags import orchestrate
    from jobs.__main__ import main

    source, results, build_seconds = indexed_lake
    lake = Lake(copy_lake(source.root, tmp_path_factory.mktemp("taken") / "lake"))
    newer = results["newer"]["extract"]["checkpoint_id"]
    first = lake.read(
        "proponents",
        filters=[("checkpoint_id", "=", newer), ("method", "=", "trackstar"), ("rank", "=", 1)],
        columns=["query_id", "doc_id"],
    ).to_pylist()
    top1 = sorted(first, key=lambda r: r["query_id"])[0]
    documents = lake.read("documents", columns=["doc_id", "partition"]).to_pylist()
    other = next(d["doc_id"] for d in documents if d["partition"] == 1 and d["doc_id"] != top1["doc_id"])
    urls = [top1["doc_id"], QUOTED_URL, other]
    assert len(set(urls)) == 3
    listing = tmp_path_factory.mktemp("urls") / "urls.txt"
    listing.write_text("# takedown list\n\n" + "\n".join(urls) + "\n" + urls[0] + "\n")
    before = {
        "counts": _counts(lake, urls),
        "documents": lake.read("documents").num_rows,
        "proponents": _proponents(lake),
        "r_train": {
            checkpoint: _r_train(lake, checkpoint, r["extract"]["fingerprint"])
            for checkpoint, r in ((r["extract"]["checkpoint_id"], r) for r in results.values())
        },
    }
    assert main(["takedown", "--urls", str(listing), "--reason", REASON, "--queue", "--lake", lake.root]) == 0
    (request,) = lake.read("takedown_requests", columns=["run_id"])["run_id"].unique().to_pylist()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRACKSTAR_LAKE_ROOT", lake.root)
        summary = orchestrate.take_down_requested()
        again = orchestrate.take_down_requested()
    (run,) = lake.read("runs", filters=[("run_id", "=", summary["run_id"])]).to_pylist()
    result = json.loads(run["counts_json"])  # what the run recorded (the task returns a summary of it)
    assert summary["deleted"] == result["deleted"]
    return lake, results, urls, top1, before, result, again, request, build_seconds


def test_no_table_holds_the_taken_down_documents(taken):
    lake, results, urls, top1, before, result, again, _, _ = taken
    assert all(before["counts"][t] > 0 for t in ("documents", "tokens", "train_gradients", "trackstar_index"))
    assert before["counts"]["proponents"] > 0  # one of them was a top-1 proponent
    assert _counts(lake, urls) == {table: 0 for table in takedown.DOC_TABLES}
    assert result["deleted"] == {t: n for t, n in before["counts"].items()}
    assert lake.read("documents").num_rows == before["documents"] - 3
    assert again == {"pending": 0}  # the request is done: the next maintenance run does nothing
    # each table's delete is one Delta commit carrying the run id (the old files go at the next vacuum past retention)
    for table in ("documents", "tokens", "train_gradients"):
        assert lake.history(table, limit=1)[0].get("trackstar.takedown_run") == result["run_id"]


def test_r_train_equals_the_autocorrelation_of_the_remaining_stored_vectors(taken):
    lake, results, urls, _, before, result, _, _, _ = taken
    assert {s["how"] for s in result["sums"]} == {"subtracted"}  # float32: exact, no re-extraction
    assert len(result["refitted"]) == 2  # both checkpoints' Hessians of fact-world
    for r in results.values():
        checkpoint, fingerprint = r["extract"]["checkpoint_id"], r["extract"]["fingerprint"]
        rows, vectors = _stored_vectors(lake, checkpoint, fingerprint)
        assert not set(rows["doc_id"].to_pylist()) & set(urls)
        reference = Autocorrelation([16] * (vectors.shape[1] // 16)).add(torch.from_numpy(vectors)).mean()
        stored, n_samples = _r_train(lake, checkpoint, fingerprint)
        old, old_n = before["r_train"][checkpoint]
        assert n_samples == rows.num_rows < old_n
        for now, was, expected in zip(stored, old, reference):
            scale = float(expected.abs().max())
            torch.testing.assert_close(now.double(), expected, rtol=1e-5, atol=1e-5 * scale)
        moved = max(
            float((n.double() - w.double()).abs().max() / e.abs().max()) for n, w, e in zip(stored, old, reference)
        )
        assert moved > 1e-3  # the documents' share was real: an uncorrected R_train fails the check above


@pytest.mark.parametrize("method", METHODS)
def test_proponents_equal_brute_force_scoring_after_the_takedown(taken, method):
    lake, results, urls, top1, before, _, _, _, _ = taken
    for r in results.values():
        checkpoint, fingerprint = r["extract"]["checkpoint_id"], r["extract"]["fingerprint"]
        train_rows, train = _stored_vectors(lake, checkpoint, fingerprint)
        query_ids, queries, _ = score.query_vectors(lake, "fact-world", checkpoint, fingerprint, 0)
        train_blocks, query_blocks, unit_norm = score.method_matrices(
            lake, method, checkpoint, "fact-world", fingerprint
        )
        t = prepare(torch.from_numpy(train), Preconditioner(train_blocks) if train_blocks else None, unit_norm)
        q = prepare(queries, Preconditioner(query_blocks) if query_blocks else None, unit_norm)
        scores = (q @ t.T).numpy()
        keys = list(zip(train_rows["doc_id"].to_pylist(), train_rows["chunk"].to_pylist()))
        stored = lake.read("proponents", filters=[("checkpoint_id", "=", checkpoint), ("method", "=", method)])
        assert stored.num_rows == len(query_ids) * TOP_K and not set(stored["doc_id"].to_pylist()) & set(urls)
        by_query = {}
        for row in stored.to_pylist():
            by_query.setdefault(row["query_id"], {})[row["rank"]] = row
        for qi, query_id in enumerate(query_ids):
            ranked = [by_query[query_id][rank] for rank in range(1, TOP_K + 1)]
            best = np.sort(scores[qi])[::-1][:TOP_K]
            np.testing.assert_allclose([r["score"] for r in ranked], best, rtol=1e-4, atol=1e-6)
            chosen = [keys.index((r["doc_id"], r["chunk"])) for r in ranked]  # the same chunks, up to exact ties
            np.testing.assert_allclose(scores[qi, chosen], best, rtol=1e-4, atol=1e-6)
    was = {(c, m, q, k): d for c, m, q, k, d, _, _ in before["proponents"]}
    newer = results["newer"]["extract"]["checkpoint_id"]
    now = {(c, m, q, k): d for c, m, q, k, d, _, _ in _proponents(lake)}
    assert (
        was[(newer, "trackstar", top1["query_id"], 1)]
        == top1["doc_id"]
        != now[(newer, "trackstar", top1["query_id"], 1)]
    )


def test_the_takedowns_table_and_the_run_say_what_happened(taken):
    lake, results, urls, _, before, result, _, request, _ = taken
    rows = {r["url"]: r for r in lake.read("takedowns").to_pylist()}
    assert sorted(rows) == sorted(urls)
    assert {r["reason"] for r in rows.values()} == {REASON} and {r["request_id"] for r in rows.values()} == {request}
    assert {r["run_id"] for r in rows.values()} == {result["run_id"]}
    total = {}
    for row in rows.values():
        for table, n in json.loads(row["counts_json"]).items():
            total[table] = total.get(table, 0) + n
    assert total == {t: n for t, n in before["counts"].items() if n}
    assert json.loads(rows[QUOTED_URL]["counts_json"])["documents"] == 1
    (run,) = lake.read("runs", filters=[("run_id", "=", result["run_id"])]).to_pylist()
    assert run["command"] == "takedown" and run["status"] == "succeeded"
    counts = json.loads(run["counts_json"])
    assert counts["urls"] == 3 and counts["urls_found"] == 3 and len(counts["rescored"]) == 2
    assert {(r["checkpoint_id"], tuple(r["methods"])) for r in counts["rescored"]} == {
        (r["extract"]["checkpoint_id"], tuple(METHODS)) for r in results.values()
    }
    print(
        f"\n[takedown] {counts['seconds']} s for 3 documents; the full build of the newest checkpoint "
        f"(tokenize, extract, fit, score) took {taken[-1]:.1f} s"
    )


def test_a_taken_down_url_that_comes_back_is_quarantined(taken, tmp_path):
    lake, _, urls, top1, _, _, _, _, _ = taken
    from jobs.__main__ import main

    # a url not in the lake can be taken down ahead of time: nothing to delete, refit or rescore
    ahead = "https://ahead.example/never-indexed"
    (tmp_path / "ahead.txt").write_text(ahead + "\n")
    assert (
        main(["takedown", "--urls", str(tmp_path / "ahead.txt"), "--reason", "pre-emptive", "--lake", lake.root]) == 0
    )
    (row,) = lake.read("takedowns", filters=[("url", "=", ahead)]).to_pylist()
    assert json.loads(row["counts_json"]) == {} and row["request_id"] is None

    fresh = "https://fresh.example/new"
    docs = [(top1["doc_id"], "The same page, crawled again.", "2020-02-02T00:00:00Z"), (fresh, "A new page.", "t")]
    write_raw_partition(Path(lake.root) / "raw", 3, [*docs, (ahead, "x", "t")])
    result = tokenize.run(tokenize.TokenizeConfig(lake=lake.root, partitions=[3]))
    assert result["documents"] == 1 and result["quarantined_by_reason"] == {"taken down": 2}
    refused = {
        r["raw_value"]: r["reason"]
        for r in lake.read("quarantine", filters=[("run_id", "=", result["run_id"])]).to_pylist()
    }
    assert refused == {top1["doc_id"]: f"taken down: {REASON}", ahead: "taken down: pre-emptive"}
    assert lake.read("documents", filters=[("partition", "=", 3)], columns=["doc_id"])["doc_id"].to_pylist() == [fresh]


def test_sums_are_never_subtracted_twice_and_lossy_slices_are_rebuilt(indexed_lake, tmp_path):
    """A run killed after correcting the sums and before the deletes is rerun: the file's ledger
    keeps the rerun from subtracting again. A float16 slice is rebuilt from its remaining vectors."""
    source, results, _ = indexed_lake
    lake = Lake(copy_lake(source.root, tmp_path / "lake"))
    checkpoint, fingerprint = results["newer"]["extract"]["checkpoint_id"], results["newer"]["extract"]["fingerprint"]
    where = [("checkpoint_id", "=", checkpoint), ("fingerprint", "=", fingerprint), ("partition", "=", 0)]
    rows = lake.read("train_gradients", filters=where)
    urls = sorted(set(rows["doc_id"].to_pylist()))[:2]
    path = layout.autocorrelation_file(lake.root, checkpoint, fingerprint, TRAIN, 0)

    def sums():
        tensors = load_matrices(path)
        return [tensors[k] for k in sorted(tensors)], int(load_metadata(path)["count"])

    original, count = sums()
    removed = rows.filter(pa.compute.is_in(rows["doc_id"], pa.array(urls)))
    expected = Autocorrelation([b.shape[0] for b in original], [b.clone() for b in original], count).subtract(
        torch.from_numpy(decode_rows(removed))
    )
    for attempt in range(2):  # the second is the rerun of a killed run: the rows are still there
        done = correct_partition_sums(lake, checkpoint, fingerprint, 0, urls)
        assert done["how"] == ("subtracted", "already subtracted")[attempt]
        now, n = sums()
        assert n == count - removed.num_rows == expected.count
        for a, b in zip(now, expected.sums):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    # the slice stored as float16 (as `--vector-dtype float16` writes it): its sums are rebuilt
    vectors = decode_rows(rows)
    cells, _ = encode_vectors(vectors, "float16")
    lossy = rows.set_column(rows.schema.get_field_index("vector"), "vector", cells)
    lossy = lossy.set_column(lossy.schema.get_field_index("dtype"), "dtype", pa.array(["float16"] * rows.num_rows))
    lossy = lossy.set_column(lossy.schema.get_field_index("checksum"), "checksum", vector_checksums(cells))
    lake.replace_slice("train_gradients", lossy, checkpoint_id=checkpoint, partition=0, fingerprint=fingerprint)
    urls = sorted(set(rows["doc_id"].to_pylist()))[2:4]
    assert correct_partition_sums(lake, checkpoint, fingerprint, 0, urls)["how"].startswith("rebuilt")
    kept = lossy.filter(pa.compute.invert(pa.compute.is_in(lossy["doc_id"], pa.array(urls))))
    reference = Autocorrelation([b.shape[0] for b in original]).add(torch.from_numpy(decode_rows(kept)))
    now, n = sums()
    assert n == kept.num_rows
    for a, b in zip(now, reference.sums):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_a_takedown_that_died_after_its_deletes_is_completed_by_the_next_run(indexed_lake, tmp_path, monkeypatch):
    """Its rows are gone, so only its plan knows which Hessians and proponents it still owed."""
    source, results, _ = indexed_lake
    lake = Lake(copy_lake(source.root, tmp_path / "lake"))
    older = results["older"]["extract"]["checkpoint_id"]
    url = lake.read("proponents", filters=[("checkpoint_id", "=", older), ("rank", "=", 2)])["doc_id"][0].as_py()
    before = {t: n for t, n in _counts(lake, [url]).items() if n}

    def dies(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(takedown, "refit", dies)
    with pytest.raises(RuntimeError, match="killed"):
        takedown.take_down(lake, [takedown.Item(url, "dead run")])
    monkeypatch.undo()
    (dead,) = lake.read("runs", filters=[("command", "=", "takedown")]).to_pylist()
    assert dead["status"] == "failed" and not any(_counts(lake, [url]).values())  # deleted, not refitted
    assert lake.read("takedowns").num_rows == 0
    result = takedown.run_pending(lake)  # no request filed: the weekly task finds the dead run's plan
    assert result["taken_over"] == [dead["run_id"]] and len(result["refitted"]) == 2
    (row,) = lake.read("takedowns").to_pylist()
    assert row["url"] == url and row["reason"] == "dead run" and json.loads(row["counts_json"]) == before
    for r in results.values():
        checkpoint, fingerprint = r["extract"]["checkpoint_id"], r["extract"]["fingerprint"]
        assert _r_train(lake, checkpoint, fingerprint)[1] == _stored_vectors(lake, checkpoint, fingerprint)[0].num_rows
        for method in METHODS:
            rows = lake.read("proponents", filters=[("checkpoint_id", "=", checkpoint), ("method", "=", method)])
            assert rows.num_rows == lake.read("queries").num_rows * TOP_K  # rescored: no hole where the url was
    assert takedown.unfinished_plans(lake) == [] and takedown.run_pending(lake) == {"pending": 0}


HOSTILE = ["https://evil.example/') OR true OR ('", "https://b.example/back\\slash'", 'https://q.example/"x"']


def test_deletes_take_urls_as_data_and_leave_files_a_streamed_replace_reads(tmp_path):
    lake = Lake(tmp_path / "lake")
    urls = [*HOSTILE, "https://plain.example/a", "https://plain.example/b"]

    def documents(names, partition=None):
        return pa.Table.from_pylist(
            [
                {
                    "doc_id": url,
                    "partition": i % 2 if partition is None else partition,
                    "source": "s",
                    "line": i,
                    "text": "t",
                    "timestamp": "t",
                    "n_chars": 1,
                    "run_id": "r",
                }
                for i, url in enumerate(names)
            ],
            TABLES["documents"].arrow_schema,
        )

    lake.append("documents", documents(urls))
    found = takedown.rows_of(lake, "documents", HOSTILE)
    assert sorted(found["doc_id"].to_pylist()) == sorted(HOSTILE)
    assert delete_rows(lake, "documents", "doc_id", HOSTILE, found, {"trackstar.takedown_run": "run-x"}) == len(HOSTILE)
    assert sorted(lake.read("documents")["doc_id"].to_pylist()) == urls[-2:]
    assert lake.history("documents", limit=1)[0].get("trackstar.takedown_run") == "run-x"
    # a partition whose files the takedown rewrote takes a streamed slice replace (as extract --force
    # and the index write theirs); delta-rs' own delete leaves files whose strings pyarrow cannot filter
    lake.replace_slice_batches("documents", [documents(["https://new.example/c"], partition=0)], partition=0)
    assert sorted(lake.read("documents")["doc_id"].to_pylist()) == ["https://new.example/c", urls[3]]  # partition 1
