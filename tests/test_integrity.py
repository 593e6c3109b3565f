"""Corrupted bytes never become answers: every stored vector carries a checksum checked by each
reader that scores, Parquet pages written here carry CRCs, and a failed read names its table, file
and row. `jobs verify` reads a whole lake back. Real lakes (Delta tables written by the jobs), real
corruption (bytes changed in the files on disk)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from infra.lake import Lake, LakeError
from jobs import extract, fit_hessian, register_queries, score, tokenize, verify
from schemas.tables import TABLES
from schemas.vectors import CorruptVector, check_vectors, decode_rows, encode_vectors, vector_checksums
from tests.fixtures import copy_lake


@pytest.fixture(scope="module")
def scored(adam_run, tmp_path_factory):
    source, _ = adam_run
    root = copy_lake(source, tmp_path_factory.mktemp("integrity") / "lake")
    tokenize.run(tokenize.TokenizeConfig(lake=str(root)))
    register_queries.run(str(root))
    extract.run(extract.ExtractConfig(lake=str(root), projection_k=4, token_budget=512))
    fit_hessian.run(fit_hessian.FitHessianConfig(lake=str(root)))
    score.run(score.ScoreConfig(lake=str(root), methods=["trackstar"], top_k=5, index="int8"))
    return root


def _corrupted_copy(scored, tmp_path, table: str) -> tuple[Lake, str]:
    """A copy of the lake with 3 bytes changed in the middle of the vector column of one file of `table`."""
    lake = Lake(copy_lake(scored, tmp_path / "lake"))
    path = sorted(lake.open(table).file_uris())[0]
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    column = meta.row_group(0).column(names.index("vector"))
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    middle = start + column.total_compressed_size // 2
    data = bytearray(open(path, "rb").read())
    for i in range(3):
        data[middle + i] ^= 0x5A
    open(path, "wb").write(bytes(data))
    return lake, path


def test_a_changed_byte_fails_the_checksum_and_names_the_row():
    vectors = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    for dtype in ("float32", "int8"):
        cells, scales = encode_vectors(vectors, dtype)
        rows = pa.table(
            {
                "doc_id": ["a", "b", "c", "d"],
                "chunk": [0, 0, 1, 0],
                "vector": cells,
                "scale": scales if scales is not None else pa.nulls(4, pa.float32()),
                "checksum": vector_checksums(cells, scales),
            }
        )
        check_vectors(rows, "table t")  # intact: passes
        changed = bytearray(cells.buffers()[2].to_pybytes())
        changed[2 * len(changed) // 4 + 3] ^= 1  # one bit of row "c"
        broken = rows.set_column(
            2,
            "vector",
            pa.array(
                [bytes(changed[i * len(changed) // 4 : (i + 1) * len(changed) // 4]) for i in range(4)], pa.binary()
            ),
        )
        with pytest.raises(CorruptVector, match=r"table t: 1 of 4 .*doc_id 'c', chunk 1"):
            check_vectors(broken, "table t")
    # an int8 scale that changed is caught too; rows from before checksums (null) are not checked
    cells, scales = encode_vectors(vectors, "int8")
    rows = pa.table(
        {"vector": cells, "scale": pa.array(scales.to_numpy() * 2), "checksum": vector_checksums(cells, scales)}
    )
    with pytest.raises(CorruptVector):
        check_vectors(rows, "table t")
    check_vectors(rows.set_column(2, "checksum", pa.nulls(4, pa.int64())), "table t")


def test_every_stored_vector_has_its_checksum(scored):
    lake = Lake(scored)
    for table in ("train_gradients", "query_gradients", "trackstar_index"):
        rows = lake.read(table, columns=["checksum"])
        assert rows.num_rows and rows["checksum"].null_count == 0, table
    assert verify.run(verify.VerifyConfig(lake=str(scored))) == {
        name: [] for name in sorted(TABLES) if lake.exists(name)
    }


@pytest.mark.parametrize("table,index", [("train_gradients", "none"), ("trackstar_index", "int8")])
def test_corrupted_vector_bytes_fail_score_naming_table_file_and_row(scored, tmp_path, capsys, table, index):
    lake, path = _corrupted_copy(scored, tmp_path, table)
    before = lake.read("proponents").sort_by([("query_id", "ascending"), ("rank", "ascending")])
    with pytest.raises(
        LakeError, match=rf"table {table}, file .*{path.rsplit('/', 1)[-1]}.*(checksum|CRC|cannot be read)"
    ):
        score.run(score.ScoreConfig(lake=lake.root, methods=["trackstar"], top_k=5, index=index))
    after = lake.read("proponents").sort_by([("query_id", "ascending"), ("rank", "ascending")])
    assert after.equals(before)  # nothing written from corrupted vectors
    assert verify.main(verify_args(lake.root)) == 1
    assert path.rsplit("/", 1)[-1] in capsys.readouterr().out


def verify_args(root):
    import argparse

    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    return parser.parse_args(["--lake", root])


def test_a_truncated_file_is_named_by_every_reader(scored, tmp_path):
    lake = Lake(copy_lake(scored, tmp_path / "lake"))
    path = sorted(lake.open("query_gradients").file_uris())[0]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(LakeError, match=rf"table query_gradients, file .*{path.rsplit('/', 1)[-1]}: cannot be read"):
        score.run(score.ScoreConfig(lake=lake.root, methods=["trackstar"], top_k=5, index="int8"))
    problems = verify.run(verify.VerifyConfig(lake=lake.root, tables=["query_gradients"]))
    assert len(problems["query_gradients"]) == 1


def test_a_stale_checksum_fails_every_read_of_the_vectors_also_of_every_column(lake):
    """Vectors changed after their checksum was taken (pages written, and CRC'd, afterwards): a read
    of some columns and a read of every column (which already names the checksum) both refuse."""
    from tests.test_lake import gradient_rows

    rows = gradient_rows("ck1", 0, 4)
    checksums = vector_checksums(rows["vector"], rows["scale"]).to_pylist()
    checksums[2] ^= 1  # row 2's vector no longer matches
    lake.append("train_gradients", rows.append_column("checksum", pa.array(checksums, pa.int64())))
    for columns in (None, ["doc_id", "vector"], ["doc_id", "chunk", "vector", "scale", "checksum"]):
        with pytest.raises(LakeError, match=r"1 of 4 .*doc_id 'https://example.com/0/2'"):
            lake.read("train_gradients", columns=columns)
        with pytest.raises(LakeError, match=r"1 of 4 .*doc_id 'https://example.com/0/2'"):
            list(lake.read_batches("train_gradients", columns=columns))
    assert lake.read("train_gradients", columns=["doc_id", "checksum"]).num_rows == 4  # no vectors: nothing to check


def test_vectors_written_without_checksums_get_them_and_a_later_change_is_seen(lake):
    """A writer that leaves the checksum out (null) does not leave its vectors unprotected: the lake
    computes each missing one as it writes (int8 rows over their scale too) and keeps given ones."""
    from tests.test_lake import gradient_rows

    float_rows = gradient_rows("ck1", 0, 3)  # no checksum column
    cells, scales = encode_vectors(np.arange(12, dtype=np.float32).reshape(3, 4), "int8")
    int8_rows = gradient_rows("ck1", 1, 3).set_column(5, "vector", cells).set_column(7, "scale", scales)
    int8_rows = int8_rows.set_column(6, "dtype", pa.array(["int8"] * 3))
    given = vector_checksums(int8_rows["vector"], int8_rows["scale"]).to_pylist()
    int8_rows = int8_rows.append_column("checksum", pa.array([given[0], None, given[2]], pa.int64()))
    lake.append("train_gradients", pa.concat_tables([float_rows, int8_rows], promote_options="default"))
    stored = lake.read("train_gradients").sort_by([("partition", "ascending"), ("chunk", "ascending")])
    assert stored["checksum"].null_count == 0
    assert stored["checksum"].to_pylist() == [
        *vector_checksums(float_rows["vector"], None).to_pylist(),
        *given,
    ]
    changed = stored.set_column(5, "vector", pa.array([b"\1" * 16] + stored["vector"].to_pylist()[1:], pa.binary()))
    with pytest.raises(CorruptVector, match="1 of 6"):
        check_vectors(changed, "table train_gradients")


def test_a_table_written_before_checksums_gains_the_column_and_still_reads(lake):
    old_schema = pa.schema([f for f in TABLES["train_gradients"].arrow_schema if f.name != "checksum"])
    cells, _ = encode_vectors(np.ones((2, 3), np.float32), "float32")
    rows = pa.table(
        {
            "checkpoint_id": ["c", "c"],
            "partition": [0, 0],
            "doc_id": ["a", "b"],
            "chunk": [0, 0],
            "n_tokens": [3, 3],
            "vector": cells,
            "dtype": ["float32"] * 2,
            "scale": pa.nulls(2, pa.float32()),
            "norm": [1.7, 1.7],
            "fingerprint": ["f", "f"],
            "run_id": ["r", "r"],
        },
        schema=old_schema,
    )
    old = DeltaTable.create(  # as an older version of Lake.create made it
        lake.path("train_gradients"),
        old_schema,
        partition_by=["checkpoint_id", "partition"],
        configuration=TABLES["train_gradients"].table_properties,
        raise_if_key_not_exists=False,
    )
    write_deltalake(old, rows, mode="append")
    read = lake.read("train_gradients", columns=["doc_id", "vector", "checksum"])
    assert read["checksum"].null_count == 2 and read.num_rows == 2
    assert "checksum" in [f.name for f in lake.open("train_gradients").schema().fields]


def test_a_slice_re_extracted_in_another_dtype_scores_like_the_rest(scored, tmp_path):
    lake = Lake(copy_lake(scored, tmp_path / "lake"))

    def ranked(index: str) -> dict:  # each scoring path against itself: they may break near-ties apart
        score.run(score.ScoreConfig(lake=lake.root, methods=["trackstar"], top_k=5, index=index))
        found: dict = {}
        for row in sorted(lake.read("proponents").to_pylist(), key=lambda r: r["rank"]):
            found.setdefault(row["query_id"], []).append((row["doc_id"], row["score"]))
        return found

    before = {index: ranked(index) for index in ("none", "int8")}
    extract.run(
        extract.ExtractConfig(
            lake=lake.root, projection_k=4, token_budget=512, vector_dtype="float16", force=True, partitions=[0]
        )
    )
    dtypes = lake.distinct("train_gradients", ["partition", "dtype"])
    assert {d for p, d in dtypes if p == 0} == {"float16"} and {d for p, d in dtypes if p != 0} == {"float32"}
    for index in ("none", "int8"):
        after = ranked(index)
        assert after.keys() == before[index].keys()
        for query, was in before[index].items():
            # the same first document, or one that tied with it (duplicated documents score alike and
            # float16 rounding may order them otherwise)
            tied = {doc for doc, value in was if value >= was[0][1] - 1e-3 * abs(was[0][1])}
            assert after[query][0][0] in tied, (index, query, after[query][:2], was[:2])


def _answers(lake: Lake) -> list:
    rows = lake.read("proponents", columns=["query_id", "method", "rank", "doc_id", "chunk", "score"])
    return sorted(rows.to_pylist(), key=lambda r: (r["method"], r["query_id"], r["rank"]))


@pytest.mark.parametrize("destination", ["folder", "s3"])
def test_a_moved_lake_scores_identically(scored, tmp_path, s3_bucket, destination):
    from infra import storage
    from jobs.catalog import checkpoint_folder, load_preconditioner

    moved_from = copy_lake(scored, tmp_path / "before")
    before = _answers(Lake(moved_from))
    if destination == "folder":
        root = str(shutil.move(moved_from, tmp_path / "elsewhere" / "lake"))
    else:
        root = f"s3://{s3_bucket}/moved/lake"
        storage.upload_dir(moved_from, root)
        shutil.rmtree(moved_from)  # nothing may be read from the old place
    lake = Lake(root)
    stored = {
        r["path"] for t in ("checkpoints", "hessians", "query_sets") for r in lake.read(t, columns=["path"]).to_pylist()
    }
    assert stored and not any(p.startswith(("/", "s3://")) for p in stored), stored
    checkpoint_id = lake.read("checkpoints", columns=["checkpoint_id"])["checkpoint_id"][0].as_py()
    assert checkpoint_folder(lake, checkpoint_id).exists()
    fingerprint = lake.read("hessians", columns=["fingerprint"])["fingerprint"][0].as_py()
    load_preconditioner(lake, checkpoint_id, "fact-world", fingerprint, "inverse_root")  # checksum-verified
    score.run(score.ScoreConfig(lake=root, methods=["trackstar"], top_k=5, index="int8"))
    after = _answers(lake)
    assert [(r["query_id"], r["rank"], r["doc_id"]) for r in after] == [
        (r["query_id"], r["rank"], r["doc_id"]) for r in before
    ]
    np.testing.assert_allclose([r["score"] for r in after], [r["score"] for r in before], rtol=1e-6)


def _junk_partition(root, n_documents: int = 30) -> None:
    """Documents of one rare letter pair repeated to fill the model's context, as junk in a real C4
    partition is: their gradients (Adam-corrected, where the model saw little) are ~16x the corpus's
    median norm here, whose own chunks span 0.36-1.8x."""
    import gzip
    import json

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(root / "model" / "tokenizer" / "tokenizer.json"))
    rng, lines = np.random.default_rng(7), []
    for i in range(n_documents):
        pair, text = "".join(rng.choice(list("qxzjkvw"), 2)), ""
        while len(tokenizer.encode(text + pair).ids) < 60:  # one chunk of nearly the whole context (64)
            text += pair
        lines.append(
            json.dumps({"text": text, "url": f"https://junk.example/{i}", "timestamp": "2019-04-25T00:00:00Z"})
        )
    with gzip.open(root / "raw" / "c4-train.00002-of-00003.json.gz", "wt", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")


def _mrr(lake: Lake, method: str = "trackstar") -> float:
    from evaluation.metrics import attribution_per_query

    truth = {r["query_id"]: set(r["stating_doc_ids"] or ()) for r in lake.read("queries").to_pylist()}
    ranked: dict = {}
    for r in sorted(lake.read("proponents", filters=[("method", "=", method)]).to_pylist(), key=lambda r: r["rank"]):
        ranked.setdefault(r["query_id"], []).append(r["doc_id"])
    return float(np.mean([m["mrr"] for m in attribution_per_query(ranked, truth, 5).values()]))


def test_junk_documents_are_left_out_of_the_hessian_and_do_not_move_the_answers(scored, adam_run, tmp_path):
    """Junk chunks leave R_train at the default threshold; score leaves out of the proponents only
    outliers `outlier_proponent_ratio` times the median norm or more (default 100: real junk, ~10^4
    times here in C4-like data; the corpus's own tail, up to ~40x on the embedded world, stays a
    candidate). This world's junk is a few to tens of times the median norm (6-35x under the full
    rank-1 correction, 6-60x under the exact floored one), so the test lowers that ratio to 5 and the
    R_train threshold to z = 3 (the default z put it at 6.7x: 3 of the 30 junk chunks stayed) to see
    them work. Trusted, the junk costs 0.067 of MRR under the default half correction (more than 0.1 under
    the full one); left out of R_train, none."""
    clean = Lake(scored)
    clean_fit = [r for r in clean.read("runs").to_pylist() if r["command"] == "fit-hessian"][-1]
    root = copy_lake(adam_run[0], tmp_path / "lake")
    _junk_partition(root)
    tokenize.run(tokenize.TokenizeConfig(lake=str(root)))
    register_queries.run(str(root))
    extract.run(extract.ExtractConfig(lake=str(root), projection_k=4, token_budget=512))
    lake = Lake(root)
    norms = lake.read("train_gradients", columns=["partition", "norm"])
    junk = np.array([n for p, n in zip(norms["partition"].to_pylist(), norms["norm"].to_pylist()) if p == 2])
    junk_proponents = lambda: sum("junk.example" in r["doc_id"] for r in lake.read("proponents").to_pylist())  # noqa: E731

    trusting = fit_hessian.run(fit_hessian.FitHessianConfig(lake=str(root), outlier_z=float("inf")))
    score.run(score.ScoreConfig(lake=str(root), methods=["trackstar"], top_k=5, index="none"))
    mrr_trusting = _mrr(lake)
    robust = fit_hessian.run(fit_hessian.FitHessianConfig(lake=str(root), alarm_factor=10.0, outlier_z=3.0))
    score.run(score.ScoreConfig(lake=str(root), methods=["trackstar"], top_k=5, index="none"))
    mrr_default, junk_default = _mrr(lake), junk_proponents()
    score.run(
        score.ScoreConfig(lake=str(root), methods=["trackstar"], top_k=5, index="none", outlier_proponent_ratio=5.0)
    )
    mrr_robust, mrr_clean = _mrr(lake), _mrr(clean)
    print(
        f"λ: clean {json.loads(clean_fit['counts_json'])['lambda']:.4g}, junk trusted {trusting['lambda']:.4g}, "
        f"junk left out {robust['lambda']:.4g}; damping ×{trusting['damping'] / robust['damping']:.3g} when trusted; "
        f"MRR clean {mrr_clean:.3f}, junk trusted {mrr_trusting:.3f}, junk out of R_train {mrr_default:.3f} "
        f"({junk_default} junk proponents), and out of the proponents {mrr_robust:.3f}"
    )

    outliers = lake.read("train_outliers").to_pylist()
    assert {r["partition"] for r in outliers} == {2}  # junk only: no chunk of the corpus is left out
    assert len(outliers) == int((junk > outliers[0]["threshold"]).sum()) == len(junk)
    assert robust["n_train"] == trusting["n_train"] - len(outliers)
    assert robust["lambda"] == pytest.approx(json.loads(clean_fit["counts_json"])["lambda"], rel=1e-6)
    assert any(a.startswith("damping moved") for a in robust["alarms"]), robust["alarms"]
    assert mrr_trusting < mrr_clean - 0.05 < mrr_default  # the junk did move the answers; its Hessian, most of it
    assert abs(mrr_robust - mrr_clean) <= 0.01 and junk_proponents() == 0


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_outliers_come_out_of_the_sums_exactly_whatever_the_dtype(lake, dtype):
    """float32 rows: the outliers' outer products are subtracted from the extraction's sums; a lossy
    dtype: the other rows' sums are rebuilt from the stored vectors. Either equals the sums of the
    rest computed directly."""
    import torch

    from gradient_kernels.hessian import Autocorrelation
    from gradient_kernels.robust import outlier_threshold

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((200, 6)).astype(np.float32) * rng.uniform(0.5, 2.0, (200, 1)).astype(np.float32)
    vectors[[5, 77, 150]] *= 1e4  # three junk chunks
    cells, scales = encode_vectors(vectors, dtype)
    scale = scales if scales is not None else pa.nulls(200, pa.float32())
    stored = decode_rows(pa.table({"vector": cells, "dtype": [dtype] * 200, "scale": scale}))
    rows = pa.table(
        {
            "checkpoint_id": ["c"] * 200,
            "partition": [i % 2 for i in range(200)],
            "doc_id": [f"d{i}" for i in range(200)],
            "chunk": [0] * 200,
            "n_tokens": [8] * 200,
            "vector": cells,
            "dtype": [dtype] * 200,
            "scale": scale,
            "norm": np.linalg.norm(stored, axis=1),
            "fingerprint": ["f"] * 200,
            "checksum": vector_checksums(cells, scales),
            "run_id": ["r"] * 200,
        }
    )
    for partition in (0, 1):
        lake.replace_slice_batches(
            "train_gradients",
            iter([rows.filter(pa.array([p == partition for p in rows["partition"].to_pylist()]))]),
            checkpoint_id="c",
            partition=partition,
        )
    summed = Autocorrelation([2, 4]).add(torch.from_numpy(vectors))  # what extraction summed (float32)
    assert outlier_threshold(np.linalg.norm(stored, axis=1)) < 1e3
    trimmed, flagged = fit_hessian.without_outliers(lake, "c", "f", summed, z=4.0)
    assert sorted(flagged["doc_id"].to_pylist()) == ["d150", "d5", "d77"]
    rest = np.delete(stored if dtype != "float32" else vectors, [5, 77, 150], axis=0)
    expected = Autocorrelation([2, 4]).add(torch.from_numpy(rest))
    assert trimmed.count == 197
    for got, want in zip(trimmed.sums, expected.sums):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-6 * float(want.abs().max()))


def test_a_tokenized_raw_file_that_disappears_is_reported(scored, tmp_path, capsys):
    root = copy_lake(scored, tmp_path / "lake")
    (root / "raw" / "c4-train.00001-of-00002.json.gz").unlink()
    result = tokenize.run(tokenize.TokenizeConfig(lake=str(root)))
    assert result["raw_missing"] == [1] and result["tokenized"] == []
    assert "partition(s) [1] are tokenized in the lake but their raw files are gone" in capsys.readouterr().out


def test_batches_read_ahead_are_the_same_and_a_readers_error_reaches_the_caller(scored, tmp_path):
    import threading

    lake = Lake(scored)
    read = dict(table="train_gradients", columns=["doc_id", "chunk", "vector"], rows=64)
    assert pa.concat_tables(lake.read_batches(**read, ahead=True)).equals(pa.concat_tables(lake.read_batches(**read)))
    batches = lake.read_batches(**read, ahead=True)
    next(batches)
    batches.close()  # a caller that stops early stops the reading thread
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]
    corrupted, path = _corrupted_copy(scored, tmp_path, "train_gradients")
    with pytest.raises(LakeError, match=rf"table train_gradients, file .*{path.rsplit('/', 1)[-1]}"):
        for _ in corrupted.read_batches(**read, ahead=True):
            pass
