"""The published SQL views (named queries of jobs/sql.py, docs/sql-views.md) on a real indexed lake
(tests/indexed_lake.py: two checkpoints scored), each against the same numbers computed in Python
from the tables; plus odd urls (ports, user@, upper case, quotes, an id that is no url, a proponent
whose document is gone) appended as proponents of a probe method."""

from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pytest

from infra.lake import Lake
from jobs.sql import SQL_QUERIES, run_query
from schemas.tables import TABLES
from tests.fixtures import copy_lake
from tests.indexed_lake import QUOTED_URL, TOP_K, built_indexed_lake  # noqa: F401

INFLUENCE = {
    "influence_by_host": ("host", lambda slot, doc: urlsplit(slot["doc_id"]).hostname),
    "influence_by_crawl_month": ("crawl_month", lambda slot, doc: doc["timestamp"][:7] if doc else None),
    "influence_by_partition": ("partition", lambda slot, doc: doc["partition"] if doc else None),
}
ODD_URLS = [
    "HTTPS://User:pw@Mixed.Example:8080/a?b#c",
    "https://mixed.example/other",
    "not-a-url",
    QUOTED_URL,
    "https://gone.example/never-tokenized",
]


@pytest.fixture(scope="module")
def viewed(indexed_lake, tmp_path_factory):
    """A copy of the indexed lake with a probe method's proponents naming odd urls."""
    source, results, _ = indexed_lake
    lake = Lake(copy_lake(source.root, tmp_path_factory.mktemp("views") / "lake"))
    newer = results["newer"]["extract"]["checkpoint_id"]
    rows = [
        {
            "query_set": "fact-world",
            "checkpoint_id": newer,
            "query_id": f"Q{q:05d}",
            "method": "probe",
            "rank": rank,
            "doc_id": url,
            "chunk": 0,
            "score": 1.0 / (q + rank),
            "run_id": "probe",
        }
        for q in range(3)
        for rank, url in enumerate(ODD_URLS[q:] + ODD_URLS[:q], start=1)
    ]
    lake.append("proponents", pa.Table.from_pylist(rows, TABLES["proponents"].arrow_schema))
    return lake, results


def _python_influence(lake, checkpoint_id, method, group_of):
    slots = lake.read(
        "proponents",
        filters=[("query_set", "=", "fact-world"), ("checkpoint_id", "=", checkpoint_id), ("method", "=", method)],
    ).to_pylist()
    documents = {
        d["doc_id"]: d for d in lake.read("documents", columns=["doc_id", "timestamp", "partition"]).to_pylist()
    }
    groups = {}
    for slot in slots:
        groups.setdefault(group_of(slot, documents.get(slot["doc_id"])), []).append(slot)
    return {
        key: {
            "n_slots": len(members),
            "total_score": sum(m["score"] for m in members),
            "mean_rank": float(np.mean([m["rank"] for m in members])),
            "n_queries": len({m["query_id"] for m in members}),
            "n_documents": len({m["doc_id"] for m in members}),
        }
        for key, members in groups.items()
    }


@pytest.mark.parametrize("name", sorted(INFLUENCE))
@pytest.mark.parametrize("method", ["trackstar", "probe"])
def test_influence_views_equal_python(spark, viewed, name, method):
    lake, results = viewed
    column, group_of = INFLUENCE[name]
    checkpoint_id = results["newer"]["extract"]["checkpoint_id"]
    params = {"query_set": "fact-world", "checkpoint_id": checkpoint_id, "method": method}
    rows = [r.asDict() for r in run_query(spark, lake, name, params).collect()]
    expected = _python_influence(lake, checkpoint_id, method, group_of)
    assert len(expected) > 1 and sorted(expected, key=str) == sorted((r[column] for r in rows), key=str)
    for row in rows:
        want = expected[row[column]]
        assert {k: row[k] for k in ("n_slots", "n_queries", "n_documents")} == {
            k: want[k] for k in ("n_slots", "n_queries", "n_documents")
        }
        assert row["total_score"] == pytest.approx(want["total_score"], rel=1e-9)
        assert row["mean_rank"] == pytest.approx(want["mean_rank"], rel=1e-12)
    totals = [r["total_score"] for r in rows]
    assert totals == sorted(totals, reverse=True)
    if method == "probe" and name == "influence_by_host":  # the odd urls: lowercased, no port or user, NULL
        assert {r["host"] for r in rows} == {"mixed.example", "quote.example", "gone.example", None}
    if method == "probe" and name != "influence_by_host":  # documents that are not in the lake group under NULL
        assert None in {r[column] for r in rows}


def _python_drift(lake, a, b, k):
    def top(checkpoint_id):
        rows = lake.read(
            "proponents",
            filters=[
                ("query_set", "=", "fact-world"),
                ("method", "=", "trackstar"),
                ("checkpoint_id", "=", checkpoint_id),
            ],
        ).to_pylist()
        found = {}
        for r in rows:
            if r["rank"] <= k:
                docs = found.setdefault(r["query_id"], {})
                docs[r["doc_id"]] = min(r["rank"], docs.get(r["doc_id"], r["rank"]))
        return found

    top_a, top_b = top(a), top(b)
    per_query = {}
    for query in sorted(set(top_a) | set(top_b)):
        docs_a, docs_b = top_a.get(query, {}), top_b.get(query, {})
        shared = sorted(set(docs_a) & set(docs_b))
        correlation = (
            float(np.corrcoef([docs_a[d] for d in shared], [docs_b[d] for d in shared])[0, 1])
            if len(shared) >= 2
            else None
        )
        per_query[query] = {
            "n_a": len(docs_a),
            "n_b": len(docs_b),
            "n_shared": len(shared),
            "overlap": len(shared) / max(len(docs_a), len(docs_b)),
            "entered": sorted(set(docs_b) - set(docs_a)),
            "left_docs": sorted(set(docs_a) - set(docs_b)),
            "rank_correlation": correlation,
        }
    both = [q for q in per_query.values() if q["n_a"] and q["n_b"]]
    correlations = [q["rank_correlation"] for q in per_query.values() if q["rank_correlation"] is not None]
    overall = {
        "n_shared": sum(q["n_shared"] for q in per_query.values()),
        "overlap": float(np.mean([q["overlap"] for q in both])),
        "n_entered": sum(len(q["entered"]) for q in per_query.values()),
        "n_left": sum(len(q["left_docs"]) for q in per_query.values()),
        "rank_correlation": float(np.mean(correlations)) if correlations else None,
        "n_queries": len(both),
    }
    return per_query, overall


@pytest.mark.parametrize("k", [3, TOP_K])
def test_proponent_drift_equals_python(spark, viewed, k):
    lake, results = viewed
    a, b = (results[c]["extract"]["checkpoint_id"] for c in ("older", "newer"))
    params = {"query_set": "fact-world", "method": "trackstar", "checkpoint_a": a, "checkpoint_b": b, "k": str(k)}
    rows = [r.asDict() for r in run_query(spark, lake, "proponent_drift", params).collect()]
    per_query, overall = _python_drift(lake, a, b, k)
    assert [r["scope"] for r in rows] == ["query"] * len(per_query) + ["overall"]
    assert [r["query_id"] for r in rows[:-1]] == sorted(per_query)
    for row in rows[:-1]:
        want = per_query[row["query_id"]]
        for key in ("n_a", "n_b", "n_shared", "entered", "left_docs"):
            assert row[key] == want[key], (row["query_id"], key)
        assert (row["n_entered"], row["n_left"]) == (len(want["entered"]), len(want["left_docs"]))
        assert row["overlap"] == pytest.approx(want["overlap"], rel=1e-12)
        assert row["rank_correlation"] == (
            None if want["rank_correlation"] is None else pytest.approx(want["rank_correlation"], rel=1e-9, abs=1e-12)
        )
    total = rows[-1]
    assert total["query_id"] is None and total["n_queries"] == overall["n_queries"] > 0
    for key in ("n_shared", "n_entered", "n_left"):
        assert total[key] == overall[key]
    assert total["overlap"] == pytest.approx(overall["overlap"], rel=1e-12)
    assert total["rank_correlation"] == (
        None if overall["rank_correlation"] is None else pytest.approx(overall["rank_correlation"], rel=1e-9)
    )
    assert overall["n_entered"] > 0  # the checkpoints differ: the comparison is not trivially all-equal
    same = [r.asDict() for r in run_query(spark, lake, "proponent_drift", params | {"checkpoint_a": b}).collect()]
    assert same[-1]["overlap"] == 1.0 and same[-1]["n_entered"] == same[-1]["n_left"] == 0


def test_views_are_listed_and_bind_their_parameters_as_values(spark, viewed, capsys):
    from jobs.__main__ import main

    lake, results = viewed
    assert main(["sql", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in (*INFLUENCE, "proponent_drift"):
        usage = " ".join([name, *(f"--param {key}=..." for key in SQL_QUERIES[name].params)])
        assert usage in listed
    checkpoint_id = results["newer"]["extract"]["checkpoint_id"]
    hostile = {"query_set": "x' OR '1'='1", "checkpoint_id": checkpoint_id, "method": "trackstar"}
    assert run_query(spark, lake, "influence_by_host", hostile).collect() == []
    params = [f"--param={k}={v}" for k, v in (("query_set", "fact-world"), ("checkpoint_id", checkpoint_id))]
    assert main(["sql", "influence_by_partition", *params, "--param=method=trackstar", "--lake", lake.root]) == 0
    assert "n_slots" in capsys.readouterr().out


def test_the_explorer_drift_page_shows_both_checkpoints_top_k_side_by_side(indexed_lake):
    from fastapi.testclient import TestClient

    from explorer import explore
    from explorer.pages import query_path

    lake, results, _ = indexed_lake
    older, newer = results["older"]["extract"]["checkpoint_id"], results["newer"]["extract"]["checkpoint_id"]
    client = TestClient(explore.create_app(lake.root), base_url="http://127.0.0.1")
    rows = lake.read("proponents", filters=[("method", "=", "trackstar")]).to_pylist()
    query_id = sorted({r["query_id"] for r in rows})[0]
    top = {
        c: [
            r["doc_id"]
            for r in sorted(rows, key=lambda r: r["rank"])
            if r["query_id"] == query_id and r["checkpoint_id"] == c
        ][:5]
        for c in (older, newer)
    }
    page = client.get(query_path(query_id, "drift"), params={"k": 5})
    assert page.status_code == 200, page.text
    html = page.text
    assert html.index(f"data-checkpoint='{older}'") < html.index(f"data-checkpoint='{newer}'")  # older on the left
    shared = set(top[older]) & set(top[newer])
    assert html.count("data-change='kept'") == 2 * len(shared)
    assert html.count("data-change='left'") == len(set(top[older]) - shared)
    assert html.count("data-change='entered'") == len(set(top[newer]) - shared)
    assert f"{len(shared) / max(len(top[older]), len(top[newer])):.2f}</b>" in html
    assert "drift-link" in client.get(query_path(query_id), params={"checkpoint": newer}).text
    assert client.get(query_path("no-such-query", "drift")).status_code == 404
