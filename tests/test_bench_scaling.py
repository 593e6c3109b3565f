"""The scaling bench's corpora: replicated vectors read back through the verified reader (their
checksums match the perturbed bytes; the source rows get theirs as the lake writes them), and the
small files its compaction stage compacts."""

import numpy as np
import pyarrow as pa

from bench import scaling
from infra.lake import Lake
from schemas.vectors import decode_vectors
from tests.test_lake import gradient_rows


def test_replicated_vectors_are_perturbed_copies_that_pass_the_checksum_checks(tmp_path):
    source, scratch = Lake(tmp_path / "source"), Lake(tmp_path / "scratch")
    source.append("train_gradients", pa.concat_tables([gradient_rows("ck1", 0, 5), gradient_rows("ck1", 1, 3)]))
    scaling.replicate_vectors(source, scratch, range(0, 3), "ck1", "fp")
    rows = scratch.read("train_gradients")  # checks every vector against its checksum
    assert sorted(set(rows["partition"].to_pylist())) == [0, 1, 1000, 1001, 2000, 2001]
    assert rows.num_rows == 3 * 8 and len(set(zip(rows["doc_id"].to_pylist(), rows["chunk"].to_pylist()))) == 24
    by_partition = {
        p: decode_vectors(part["vector"], "float32", part["scale"])
        for p in (0, 1000, 2000)
        for part in [rows.filter(pa.compute.equal(rows["partition"], p)).sort_by("chunk")]
    }
    assert np.array_equal(by_partition[0], decode_vectors(gradient_rows("ck1", 0, 5)["vector"], "float32", None))
    for copy in (1000, 2000):  # near the original, not equal to it: copies do not tie
        assert not np.array_equal(by_partition[copy], by_partition[0])
        np.testing.assert_allclose(by_partition[copy], by_partition[0], atol=0.1)


def test_small_files_of_two_fingerprints_in_one_partition_compact_per_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "ROWS_PER_SMALL_FILE", 2)
    source, scratch = Lake(tmp_path / "source"), Lake(tmp_path / "scratch")
    source.append("train_gradients", gradient_rows("ck1", 3, 7))
    scaling.replicate_as_small_files(source, scratch, 2, "ck1", "fp")
    before = scratch.read("train_gradients")
    assert set(before["partition"].to_pylist()) == {0} and before.num_rows == 14
    assert len(scratch.open("train_gradients").file_uris()) == 8  # 4 appends of 2, 2, 2, 1 rows per copy

    scaling.run_stage("compact", str(tmp_path / "scratch"), "", "ck1", "fp", "trex")

    after = scratch.read("train_gradients")
    key = ["doc_id", "chunk", "fingerprint", "vector"]
    assert sorted(after.select(key).to_pylist(), key=str) == sorted(before.select(key).to_pylist(), key=str)
    fragments = list(scratch.open("train_gradients").to_pyarrow_dataset().get_fragments())
    fingerprints = [set(f.to_table(columns=["fingerprint"])["fingerprint"].to_pylist()) for f in fragments]
    assert sorted(map(sorted, fingerprints)) == [["fp"], ["fp-second"]]  # one file each
