"""A user's second day with their own data: imports that are all or nothing, a half-imported lake
repaired by one command, names from `--name`, refusals in one line plus their problems, and a report
that prints numbers at their magnitude with a colour-blind-safe key (issue 25)."""

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from demo import import_data, pipeline, world
from evaluation.config import CORRECTION_VARIANTS
from jobs.__main__ import main as jobs_main
from tests.fixtures import WORLD


def snapshot(root: Path):
    """Every file, folder and link under root with its bytes' sha256 (None when root does not exist)."""
    if not root.exists():
        return None
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[key] = "folder"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _gzip_lines(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A tiny generated corpus and its queries, as a user brings them (a folder whose name is no valid
    name), and a lake that already holds one import of them."""
    root = tmp_path_factory.mktemp("second-day")
    world.run(world.WorldConfig(out_dir=str(root / "generated"), **WORLD))
    corpus = root / "My Corpus (v2)"
    shutil.copytree(root / "generated" / "raw", corpus)
    queries = root / "queries.jsonl"
    shutil.copyfile(root / "generated" / "world" / "queries.jsonl", queries)
    imported = root / "imported"
    import_data.import_world(imported, corpus, queries)
    return root, corpus, queries, imported


def _refused(capsys, lake: Path, *args) -> str:
    """Run the pipeline as a user does; it must refuse (exit 2) with one line plus problems, no traceback."""
    code = jobs_main(["pipeline", "--lake", str(lake), *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: pipeline: import refused") and "Traceback" not in err
    return err


def _fake_checkpoint(folder: Path, tokenizer: bytes) -> Path:
    """A checkpoint folder as far as the import's checks read it (no model is loaded for a refusal)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_bytes(tokenizer)
    return folder


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ONE_LINE = ['{"text": "t", "url": "https://u.example/1", "timestamp": "2020-01-01T00:00:00Z"}']


def _corpus_with(tmp_path: Path, source: Path | None, name: str, lines: list[str]) -> Path:
    """A copy of the `source` corpus (or an empty folder) with one more partition file."""
    corpus = tmp_path / "corpus"
    shutil.copytree(source, corpus) if source else corpus.mkdir()
    _gzip_lines(corpus / name, lines)
    return corpus


def _queries_with(tmp_path: Path, queries: Path, change=None, extra: str = "") -> Path:
    """The queries file, each query changed by `change`, plus `extra` lines."""
    rows = [json.loads(line) for line in queries.read_text().splitlines()]
    text = "".join(json.dumps(change(row) if change else row) + "\n" for row in rows)
    return _write(tmp_path / "changed-queries.jsonl", text + extra)


def _elsewhere(queries: Path) -> str:
    first = json.loads(queries.read_text().splitlines()[0])
    return json.dumps(first | {"query_id": "elsewhere", "stating_doc_ids": ["https://nowhere.example/1"]}) + "\n"


# kind: (the lake before: "fresh", "imported" or "generated"; the pipeline's arguments from (tmp, corpus,
# queries); a problem the refusal names)
REFUSALS = {
    "corpus without a readable line": (
        "fresh",
        lambda tmp, c, q: [
            "--corpus",
            _corpus_with(tmp, None, "c4-x.00000-of-00001.json.gz", ["{", "[]"]),
            "--queries",
            q,
        ],
        "no readable document in the corpus (2 unreadable line(s))",
    ),
    "partition name": (
        "imported",
        lambda tmp, c, q: ["--corpus", _corpus_with(tmp, c, "c4-extra.json.gz", ONE_LINE), "--queries", q],
        "not a C4 partition name",
    ),
    "partition number taken": (
        "imported",
        lambda tmp, c, q: [
            "--corpus",
            _corpus_with(tmp, c, "c4-validation.00000-of-00002.json.gz", ONE_LINE),
            "--queries",
            q,
        ],
        "have the same partition number 0",
    ),
    "changed partition": (
        "imported",
        lambda tmp, c, q: [
            "--corpus",
            _corpus_with(tmp, c, "c4-train.00001-of-00002.json.gz", ONE_LINE),
            "--queries",
            q,
        ],
        "differ from the ones imported",
    ),
    "queries": (
        "imported",
        lambda tmp, c, q: ["--corpus", c, "--queries", _queries_with(tmp, q, extra='{"query_id": "new"}\n')],
        "missing field 'subject'",
    ),
    "stating document not in the corpus": (
        "fresh",
        lambda tmp, c, q: ["--corpus", c, "--queries", _queries_with(tmp, q, extra=_elsewhere(q))],
        "none of the query's 1 stating document(s) (stating_doc_ids) is the url of a document in the corpus",
    ),
    "targets the tokenizer cannot encode": (
        "fresh",
        lambda tmp, c, q: [
            "--corpus",
            c,
            "--queries",
            _queries_with(tmp, q, lambda r: r | {"target": " <|endoftext|>"}),
        ],
        "the tokenizer trained on the corpus can encode none of the targets",
    ),
    "checkpoint with another tokenizer": (
        "imported",
        lambda tmp, c, q: ["--corpus", c, "--queries", q, "--checkpoint", _fake_checkpoint(tmp / "theirs", b"{}")],
        "is tokenized with another tokenizer",
    ),
    "generated world": (
        "generated",
        lambda tmp, c, q: ["--corpus", c, "--queries", q],
        "holds the generated world",
    ),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_a_refused_import_leaves_the_lake_byte_for_byte_as_it_was(kind, user_files, tmp_path, capsys):
    root, corpus, queries, imported = user_files
    state, make_args, problem = REFUSALS[kind]
    lake = tmp_path / "lake"
    if state == "imported":
        shutil.copytree(imported, lake, symlinks=True)
        (lake / "model" / "tokenizer").mkdir(parents=True)  # as a trained model leaves it
        (lake / "model" / "tokenizer" / "tokenizer.json").write_text('{"ours": true}')
    elif state == "generated":
        shutil.copytree(root / "generated", lake)
    before = snapshot(lake)
    err = _refused(capsys, lake, *make_args(tmp_path, corpus, queries))
    assert problem in err, err
    assert snapshot(lake) == before  # a fresh lake stays absent: not even a folder was made


def test_every_problem_is_listed_at_once(user_files, tmp_path, capsys):
    _, corpus, _, _ = user_files
    bad = _write(tmp_path / "q.jsonl", '{"query_id": "q1"}\nnot json\n')
    err = _refused(capsys, tmp_path / "lake", "--corpus", corpus, "--queries", bad, "--checkpoint", tmp_path / "none")
    first, *problems, hint = err.splitlines()
    assert first == f"error: pipeline: import refused, 8 problem(s); nothing was written to {tmp_path / 'lake'}"
    assert problems == [
        *(f"  - {bad}:1: missing field {f!r}" for f in ("subject", "relation", "object", "target", "prompt0")),
        f"  - {bad}:1: missing field 'stating_doc_ids'",
        f"  - {bad}:2: malformed JSON (Expecting value: line 1 column 1 (char 0))",
        f"  - {tmp_path / 'none'}: the checkpoint folder does not exist",
    ]
    assert hint == "(python -m jobs --debug ... shows the traceback)"
    assert not (tmp_path / "lake").exists()


def _as_an_older_version_left_it(imported: Path, corpus: Path, lake: Path) -> Path:
    """A lake where an older import copied a partition, then refused: raw/ holds a partition no import
    recorded (and a part file an interrupted copy left)."""
    shutil.copytree(imported, lake)
    _gzip_lines(lake / "raw" / "c4-train.00002-of-00003.json.gz", ['{"text": "new", "url": "u2", "timestamp": "s"}'])
    (lake / "raw" / ".c4-train.00003-of-00004.json.gz.part").write_bytes(b"half")
    return lake


def test_a_half_imported_lake_is_repaired_by_one_command(user_files, tmp_path, capsys):
    _, corpus, queries, imported = user_files
    lake = _as_an_older_version_left_it(imported, corpus, tmp_path / "lake")
    err = _refused(capsys, lake, "--corpus", corpus, "--queries", queries)
    assert "holds partitions no import recorded (c4-train.00002-of-00003.json.gz)" in err
    assert f"python -m jobs pipeline --lake {lake} --repair-import" in err
    recorded = {p: p.read_bytes() for p in (lake / "raw").glob("c4-*.json.gz") if "00002-of-00003" not in p.name}

    assert jobs_main(["pipeline", "--lake", str(lake), "--repair-import"]) == 0
    out = capsys.readouterr().out
    assert "2 file(s) no import recorded moved to" in out
    (aside,) = (lake / "import-repair").iterdir()
    assert sorted(p.name for p in (aside / "raw").iterdir()) == [
        ".c4-train.00003-of-00004.json.gz.part",
        "c4-train.00002-of-00003.json.gz",
    ]
    assert {p: p.read_bytes() for p in (lake / "raw").glob("*")} == recorded  # the recorded import untouched
    assert jobs_main(["pipeline", "--lake", str(lake), "--repair-import"]) == 0  # a second repair finds nothing
    assert "nothing to repair" in capsys.readouterr().out
    summary = import_data.import_world(lake, corpus, queries)  # the import now goes through
    assert summary.partitions == 2


def test_repair_moves_the_world_files_of_an_import_that_never_wrote_its_marker(user_files, tmp_path, capsys):
    _, corpus, queries, _ = user_files
    lake = tmp_path / "lake"
    shutil.copytree(corpus, lake / "raw")
    (lake / "world").mkdir()
    shutil.copyfile(queries, lake / "world" / "queries.jsonl")
    _refused(capsys, lake, "--corpus", corpus, "--queries", queries)
    assert jobs_main(["pipeline", "--lake", str(lake), "--repair-import"]) == 0
    assert not list((lake / "raw").iterdir()) and not (lake / "world" / "queries.jsonl").exists()
    assert import_data.import_world(lake, corpus, queries).partitions == 2


def test_repair_refuses_partitions_the_lake_already_tokenized(user_files, tmp_path, capsys):
    from infra.lake import Lake
    from schemas.tables import TABLES

    _, corpus, _, imported = user_files
    lake = _as_an_older_version_left_it(imported, corpus, tmp_path / "lake")
    row = {c.name: None for c in TABLES["documents"].columns} | {
        "doc_id": "u2",
        "partition": 2,
        "source": "c4-train.00002-of-00003.json.gz",
        "line": 1,
        "text": "new",
        "timestamp": "s",
        "n_chars": 3,
        "run_id": "test",
    }
    Lake(lake).append("documents", pa.Table.from_pylist([row], schema=TABLES["documents"].arrow_schema))
    before = snapshot(lake)
    assert jobs_main(["pipeline", "--lake", str(lake), "--repair-import"]) == 2
    err = capsys.readouterr().err
    assert "no import recorded it, but the lake tokenized it" in err and "Traceback" not in err
    assert snapshot(lake) == before


# ------------------------------------------------------------------ names
def test_names_are_made_valid_and_checked():
    from infra.names import InvalidName

    assert import_data.name_from("My Corpus (v2)") == "My-Corpus-v2"
    assert import_data.name_from("..weird..name..") == "weird.name"
    assert import_data.name_from("日本語") == "corpus" and len(import_data.name_from("x" * 300)) == 90
    assert import_data.check_name("day-two") == "day-two"
    for bad in ("o'brien", "../up", "x" * 91):
        with pytest.raises(InvalidName):
            import_data.check_name(bad)


def test_the_name_defaults_to_the_corpus_folder(user_files, tmp_path):
    _, corpus, queries, _ = user_files
    assert import_data.check_import(tmp_path / "lake", corpus, queries).name == "My-Corpus-v2"
    assert not (tmp_path / "lake").exists()


def test_a_bad_name_is_a_usage_error_before_anything_is_written(user_files, tmp_path, capsys):
    _, corpus, queries, _ = user_files
    with pytest.raises(SystemExit) as exit_:
        jobs_main(
            [
                "pipeline",
                "--lake",
                str(tmp_path / "lake"),
                "--corpus",
                str(corpus),
                "--queries",
                str(queries),
                "--name",
                "a/b",
            ]
        )
    assert exit_.value.code == 2 and "--name 'a/b' is not a valid name" in capsys.readouterr().err
    assert not (tmp_path / "lake").exists()


# ------------------------------------------------------------------ refusals in one line
def test_refusals_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from demo import pipeline as module

    def raising(error):
        def main(args):
            raise error

        return main

    monkeypatch.setattr(module, "main", raising(FileNotFoundError("no c4-*.json.gz partitions under x")))
    assert jobs_main(["pipeline"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "error: pipeline: no c4-*.json.gz partitions under x"
    with pytest.raises(FileNotFoundError):  # a refusal, with --debug: its traceback
        jobs_main(["pipeline", "--debug"])
    missing = FileNotFoundError(2, "No such file or directory")  # the OS's, not a sentence of ours: a bug
    monkeypatch.setattr(module, "main", raising(missing))
    with pytest.raises(FileNotFoundError):
        jobs_main(["pipeline"])
    monkeypatch.setattr(module, "main", raising(ValueError("a plain ValueError is no refusal")))
    with pytest.raises(ValueError):
        jobs_main(["pipeline"])


def test_the_stages_refusals_are_one_line_too(tmp_path, monkeypatch, capsys):
    """A file under raw/ that is no C4 partition name and an unregistered checkpoint, raised by the
    real functions, print one line (they printed a traceback)."""
    from demo import pipeline as module
    from infra.lake import Lake
    from jobs import catalog, tokenize

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "c4-train.first-of-two.json.gz").write_bytes(b"")
    lake = Lake(str(tmp_path / "lake"))
    lake.create("checkpoints")
    expected = {
        "error: pipeline: c4-train.first-of-two.json.gz: not a C4 partition name": lambda: tokenize.raw_partitions(
            str(raw)
        ),
        "error: pipeline: checkpoint 'nope' is not registered": lambda: catalog.registered_location(lake, "nope"),
    }
    for line, call in expected.items():
        with pytest.raises(Exception) as caught:
            call()

        def main(args, error=caught.value):
            raise error

        monkeypatch.setattr(module, "main", main)
        assert jobs_main(["pipeline"]) == 2
        assert capsys.readouterr().err.splitlines()[0].startswith(line)


def test_help_shows_the_defaults_of_every_command(capsys):
    with pytest.raises(SystemExit):
        jobs_main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "proponents kept per query (default: 10)" in text and "(default: int8)" in text


def test_pipeline_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        jobs_main(["pipeline", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: .airflow)" in text and "(default: 0)" in text and "--repair-import" in text
    assert "the setting query_set for the embedded world" in text and "(default: None)" not in text


def test_every_field_of_a_queries_message_is_documented():
    """The queries file's messages list its fields (e.g. "unknown field ... (fields: ...)"): each is
    described in the README's "Your own data"."""
    from schemas.queries import Query

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    assert [f for f in Query.model_fields if f"`{f}`" not in section] == []


# ------------------------------------------------------------------ the report
def test_numbers_are_printed_at_their_magnitude():
    from evaluation.report import magnitude, signed

    assert magnitude(1.5e-05) == "1.50e-05" and magnitude(0.0502) == "0.0502" and magnitude(0.711) == "0.711"
    assert magnitude(1.8) == "1.80" and magnitude(12345.6) == "12346" and magnitude(3.2e7) == "3.20e+07"
    assert signed(0.094) == "+0.0940" and signed(-0.007) == "-0.00700" and magnitude(None) == "—"
    assert magnitude(0) == "0"


def _hand_built_report(seeds: list[int]) -> dict:
    """A report as evaluate.run makes it, with numbers of every magnitude (no lake needed)."""
    from evaluation import evaluate
    from evaluation.categories import CATEGORIES
    from evaluation.findings import findings

    def cell(i, n_seeds):
        return {
            "n_queries": 10,
            "seeds": n_seeds,
            "mrr_seed_std": 0.0123 if n_seeds > 1 else 0.0,
            "tail_patch_queries": 5,
            "mrr": 0.5 + i / 100,
            "mrr_ci": [0.4, 0.6],
            "recall@10": 0.7,
            "recall@10_ci": [0.6, 0.8],
            "recall@10_fraction": 0.5,
            "tail_patch": 2.5e-05 * (i + 1),
            "tail_patch_ci": [1e-05, 4e-05 * (i + 1)],
            "tail_patch_delta_prob": 3e-07,
            "tail_patch_delta_prob_ci": [-1e-07, 6e-07],
        }

    once = {"bm25", "dense", "grad-dot", "grad-cos", "trak", "trackstar-no-optimizer", *CORRECTION_VARIANTS}
    methods = {m: cell(i, 1 if m in once else len(seeds)) for i, m in enumerate(evaluate.REPORT_ORDER)}
    versus = {
        m: {"mrr": [-0.2, -0.3, -0.1], "tail_patch": [1.2e-05, 0.4e-05, 2e-05], "tail_patch_delta_prob": [0, -1, 1]}
        for m in methods
        if m != "trackstar"
    }
    versus["trackstar-no-mixing"]["tail_patch"] = [-3e-06, -5e-06, -1e-06]
    versus["trackstar-no-unit-norm"]["tail_patch"] = [1e-06, -2e-06, 4e-06]
    hessian = {
        "lambda": 1.5e-05,
        "crossing_component": 12,
        "damping_min": 2.2e-06,
        "damping_max": 0.031,
        "condition_number_max": 4.1e6,
        "query_to_train_trace": 5.3e5,
        "blocks_damped_above_train_top": [],
    }
    report = {
        "checkpoint_id": "gpt2-day-two-s0-step000006",
        "query_set": "day-two",
        "run_id": "evaluate-test",
        "seeds": seeds,
        "lambda": hessian["lambda"],
        "hessian": hessian,
        "tail_patch_queries": 5,
        "methods": methods,
        "trackstar_minus": versus,
        "trackstar_over_bm25_tail_patch": {"delta_log_prob": [1.8, 1.52, 2.22], "delta_prob": [1.37, 1.26, 1.51]},
        "per_bucket": {m: {"1": {"mrr": 0.5, "recall@10": 0.6}, "10": {"mrr": 0.7, "recall@10": 0.8}} for m in methods},
        "categories": {m: dict(zip(CATEGORIES, [0.5, 0.1, 0.1, 0.1, 0.1, 0.1])) for m in methods},
    }
    report["findings"] = findings(report) + ["The tail-patch step: SGD at lr 0.001."]
    return report


def _page(report: dict) -> str:
    from evaluation.categories import CATEGORIES, Categorizer
    from evaluation.report import render_html

    return render_html(report, {}, {}, {}, None, Categorizer("/nonexistent"), CATEGORIES)


def test_the_report_prints_magnitudes_a_safe_key_and_sentences(tmp_path):
    import re

    from evaluation.report import METHOD_COLORS, bucket_plot, category_plot

    report = _hand_built_report(seeds=[0])
    page = _page(report)
    assert (
        "<title>TrackStar lake: Fact tracing on day-two</title>" in page and "<h1>Fact tracing on day-two</h1>" in page
    )
    assert "λ = 1.50e-05" in page and "+2.50e-05" in page and "+3.00e-07" in page  # not 0.000 / +0.0000
    assert not re.search(r"[+-]?0\.0+(?![0-9])", page.split("<h2>Tail-patch per method")[0])  # no number shown as zero
    # one seed: no spread over seeds anywhere
    assert "MRR spread over seeds" not in page and "<th>seeds</th>" not in page and "no spread over seeds" in page
    # a key per method, colours all different, from the colour-blind-safe palette
    keys = re.findall(r'<span class="swatch" style="background:(#[0-9A-F]{6})"', page)
    assert len(keys) == len(report["methods"]) == len(set(keys)) and set(keys) <= set(METHOD_COLORS.values())
    # findings: sentences that name the component, no raw keys
    findings = page.split("<h2>Findings</h2>")[1].split("</ul>")[0]
    for raw in ("delta_log_prob", "delta_prob", "trackstar_minus", "tail_patch", "TrackStar −"):
        assert raw not in findings, raw
    assert "<li>The Hessian preconditioner (R^-1/2) helps: TrackStar&#39;s proponents raise" in findings
    assert "Task mixing (R_query mixed into the Hessian) hurts" in findings
    assert "Unit normalisation makes no measurable difference here" in findings
    assert "1.80× as much as BM25&#39;s" in findings and "λ = 1.50e-05" in findings
    # legends outside the plotting area, one colour per line
    for fig in (
        bucket_plot(report["per_bucket"]),
        category_plot(report["categories"], tuple(report["categories"]["bm25"])),
    ):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = (fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend()])[0].get_window_extent(renderer)
        assert all(legend.x0 >= ax.get_window_extent(renderer).x1 for ax in fig.axes)
    lines = bucket_plot(report["per_bucket"]).axes[0].get_lines()
    assert len({line.get_color() for line in lines}) == len(lines) == len(report["methods"])


def test_the_spread_over_seeds_is_shown_where_several_seeds_exist():
    from evaluation import evaluate

    page = _page(_hand_built_report(seeds=[0, 1, 2]))
    rows = page.split("<h2>Table 1: methods</h2>")[1].split("</table>")[0].split("<tr>")[2:]
    assert "MRR spread over seeds (std)" in page
    once = {"bm25", "dense", "grad-dot", "grad-cos", "trak", "trackstar-no-optimizer", *CORRECTION_VARIANTS}
    several = [m for m in evaluate.REPORT_ORDER if m not in once]
    assert sum("0.0123" in row for row in rows) == len(several) == 7
    assert sum("one seed" in row for row in rows) == len(once) == 13


def test_a_model_retrained_on_a_grown_corpus_gets_new_checkpoint_ids(user_files, tmp_path):
    from dataclasses import replace

    from demo import pipeline, train_model

    _, corpus, _, _ = user_files
    lake = tmp_path / "lake"
    shutil.copytree(corpus, lake / "raw")
    config = train_model.TrainConfig(lake=str(lake))
    assert pipeline.model_tag(str(lake), "n", config) == "gpt2-n"  # nothing trained yet

    def trained(tag):  # what train-model leaves: its checkpoints and a summary naming what it learnt from
        (lake / "model" / "checkpoints" / f"{tag}-s0-step000006").mkdir(parents=True)
        digest = train_model.input_digest(lake / "raw", replace(config, model_tag=tag))
        summary = {"checkpoints": [f"{tag}-s0-step000006"], "input_digest": digest}
        (lake / "model" / "train_summary.json").write_text(json.dumps(summary))

    trained("gpt2-n")
    assert pipeline.model_tag(str(lake), "n", config) == "gpt2-n"  # the same corpus: the model is kept
    _gzip_lines(lake / "raw" / "c4-train.00002-of-00003.json.gz", ONE_LINE)
    assert pipeline.model_tag(str(lake), "n", config) == "gpt2-n-v002"  # a grown corpus: new checkpoints
    trained("gpt2-n-v002")
    assert pipeline.model_tag(str(lake), "n", config) == "gpt2-n-v002"
    _gzip_lines(lake / "raw" / "c4-train.00003-of-00004.json.gz", ONE_LINE)
    assert pipeline.model_tag(str(lake), "n", config) == "gpt2-n-v003"
    assert pipeline.model_tag(str(lake), "other", config) == "gpt2-other"  # another name starts its own
    # the DAG takes the newest checkpoint by step, ties by folder name: the retrained one sorts last
    assert sorted(["gpt2-n-v002-s0-step000006", "gpt2-n-s0-step000006"])[-1] == "gpt2-n-v002-s0-step000006"


@pytest.mark.slow
def test_names_flow_from_the_pipeline_into_tables_and_the_report(user_files, tmp_path, monkeypatch):
    """`pipeline --name day-two` on a tiny imported world (model trained, DAG, evaluation): every table
    and the report carry the name; each evaluation writes a new report folder and moves `latest`."""
    from evaluation import evaluate
    from infra import storage
    from infra.lake import Lake
    from tests.fixtures import TINY

    _, corpus, queries, _ = user_files
    monkeypatch.setenv("TRACKSTAR_PROJECTION_K", "4")  # the DAG's extraction too (its tasks read the settings)
    lake = tmp_path / "lake"
    small = dict(seeds=[0], variants=[], tail_patch_queries=2, projection_k=4)
    summary = pipeline.run(
        str(lake),
        airflow_home=str(tmp_path / ".airflow"),
        corpus=str(corpus),
        queries=str(queries),
        name="day-two",
        train_overrides=TINY,
        evaluate_overrides=small,
    )
    tables = Lake(lake)
    for table in ("queries", "query_sets", "proponents", "eval_metrics", "tail_patches", "hessians"):
        assert set(tables.read(table, columns=["query_set"])["query_set"].to_pylist()) == {"day-two"}, table
    checkpoints = tables.read("checkpoints", columns=["checkpoint_id"])["checkpoint_id"].to_pylist()
    assert checkpoints and all(c.startswith("gpt2-day-two-s0-step") for c in checkpoints)
    # the evaluation's plain-gradient vectors came from the DAG's start of the ranks (also_extract):
    # two fingerprints, one extraction plan in the whole run
    assert len(set(tables.read("train_gradients", columns=["fingerprint"])["fingerprint"].to_pylist())) == 2
    plans = [p for p in storage.list_objects(storage.join(str(lake), "_plans")) if "extract-" in p]
    assert len(plans) == 1, plans
    assert Path(summary["checkpoint"]).name.startswith("gpt2-day-two-s0-step")

    reports = lake / "reports"
    first = reports / os.readlink(reports / "latest")
    assert first.parent == reports and first.name.startswith("evaluate-")
    page = (first / "eval.html").read_text()
    assert "<h1>Fact tracing on day-two</h1>" in page and "fact-world" not in page
    assert json.loads((first / "eval.json").read_text())["query_set"] == "day-two"
    before = (first / "eval.html").read_bytes()

    again = evaluate.run(evaluate.EvaluateConfig(lake=str(lake), query_set="day-two", **small))
    second = reports / os.readlink(reports / "latest")
    assert second != first and Path(again["report_dir"]) == second and (second / "eval.html").exists()
    assert (first / "eval.html").read_bytes() == before  # never overwritten


def test_latest_names_the_newest_report_on_s3(s3_bucket):
    from evaluation import evaluate
    from infra import storage
    from infra.lake import Lake

    lake = Lake(f"s3://{s3_bucket}/lake")
    for run_id in ("evaluate-1", "evaluate-2"):
        evaluate.point_latest(lake, run_id)
    assert storage.read_text(f"s3://{s3_bucket}/lake/reports/latest.txt") == "evaluate-2\n"


# ------------------------------------------------------------------ reruns: incremental, --retrain, retention, coverage
def _table_rows(table: str, n: int, **values) -> pa.Table:
    """`n` rows of a table, every column given a plain value of its type unless set in `values`."""
    from datetime import datetime, timezone

    from schemas.tables import TABLES

    plain = {
        "STRING": "x",
        "INT": 0,
        "BIGINT": 0,
        "FLOAT": 1.0,
        "DOUBLE": 1.0,
        "BINARY": b"\0\0\0\0",
        "TIMESTAMP": datetime.now(timezone.utc),
        "ARRAY<INT>": [1],
        "ARRAY<BIGINT>": [1],
        "ARRAY<STRING>": ["x"],
    }
    spec = TABLES[table]

    def value(column, i: int):
        if column.name in ("chunk", "rank"):
            return i
        return None if column.name == "checksum" else plain[column.type]  # the lake computes checksums

    rows = [{c.name: values.get(c.name, value(c, i)) for c in spec.columns} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=spec.arrow_schema)


def _fake_registered_checkpoint(lake, checkpoint_id: str, step: int, tokenizer: bytes) -> None:
    """A checkpoint folder as far as coverage reads it (config.json, tokenizer.json) and its row."""
    folder = Path(lake.root) / "model" / "checkpoints" / checkpoint_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"n_positions": 64}')
    (folder / "tokenizer.json").write_bytes(tokenizer)
    lake.append(
        "checkpoints",
        _table_rows(
            "checkpoints", 1, checkpoint_id=checkpoint_id, step=step, path=f"model/checkpoints/{checkpoint_id}"
        ),
    )


def _string_views(lake, table: str) -> list[str]:
    import pyarrow.parquet as pq

    found = []
    for uri in lake.open(table).file_uris():
        found += [f"{uri}: {f.name}" for f in pq.read_schema(uri) if pa.types.is_string_view(f.type)]
    return found


def test_keep_checkpoints_drops_the_older_vectors_and_coverage_counts_only_the_checkpoints_tokenizer(tmp_path):
    """Two checkpoints, `old` (tokenizer T1) and `new` (T2), with rows in every vector table (several
    tables hold both in one file); every partition is tokenized with T2 now. Coverage counts none of
    old's vectors; keeping 1 drops old's rows and files, leaves new's rows as they were, written by the
    project's writer (no string_view), and says so in a runs row."""
    from demo import reruns
    from infra.lake import Lake
    from jobs.tokenize import tokenizer_fingerprint_of

    lake = Lake(tmp_path / "lake")
    _fake_registered_checkpoint(lake, "old", 8, b'{"t": 1}')
    _fake_registered_checkpoint(lake, "new", 6, b'{"t": 2}')  # fewer steps: the one just indexed still comes first
    t2 = tokenizer_fingerprint_of(b'{"t": 2}', 64)
    for partition, chunks in ((0, 3), (1, 2)):
        lake.append("tokens", _table_rows("tokens", chunks, partition=partition, tokenizer_fingerprint=t2))
    for checkpoint, partitions in (("old", (0, 1)), ("new", (0,))):
        for partition in partitions:
            rows = _table_rows("train_gradients", 2 if checkpoint == "old" else 3, checkpoint_id=checkpoint)
            lake.replace_slice_batches(
                "train_gradients",
                [rows.set_column(1, "partition", pa.array([partition] * rows.num_rows, pa.int32()))],
                checkpoint_id=checkpoint,
                partition=partition,
                fingerprint="x",
            )
        for kind in ("_autocorrelation", "_matrices/hessians"):
            (Path(lake.root) / kind / checkpoint / "f").mkdir(parents=True)
            (Path(lake.root) / kind / checkpoint / "f" / "m.safetensors").write_bytes(b"m")
    for table in ("query_gradients", "trackstar_index", "train_outliers", "hessians", "proponents"):
        rows = pa.concat_tables([_table_rows(table, 2, checkpoint_id=c) for c in ("old", "new")])
        lake.append(table, rows)  # one file holding both checkpoints' rows where checkpoint_id is no partition column

    rows = {r["checkpoint_id"]: r for r in reruns.coverage(lake.root)}
    assert (rows["new"]["chunks"], rows["new"]["vectors"], rows["new"]["coverage"]) == (5, 3, 0.6)
    assert rows["new"]["stale_vectors"] == 0 and rows["new"]["partitions"] == [0, 1]
    assert (rows["old"]["chunks"], rows["old"]["vectors"], rows["old"]["stale_vectors"]) == (0, 0, 4)
    assert rows["old"]["tokenizer"] == tokenizer_fingerprint_of(b'{"t": 1}', 64) != t2
    lines = reruns.coverage_lines(reruns.coverage(lake.root))
    assert f"tokenizer {t2}: 5 chunks in 2 partition(s) (0, 1)" in lines
    assert "  new: 3 / 5 chunks covered (60.0%), each of its 1 projection fingerprints" in lines
    assert any(
        line.startswith("  old: 0 / 0 chunks covered") and "4 vector(s) of partition(s) 0, 1" in line for line in lines
    )

    assert reruns.keep_newest(lake.root, 0, "new")["dropped"] == []  # 0: keep every checkpoint's vectors
    assert reruns.keep_newest(lake.root, 2, "new")["dropped"] == []
    before = {t: lake.read(t, filters=[("checkpoint_id", "=", "new")]) for t in reruns.VECTOR_TABLES}
    result = reruns.keep_newest(lake.root, 1, "new")
    assert (result["kept"], result["dropped"]) == (["new"], ["old"])
    assert result["rows"] == {
        "train_gradients": 4,
        "query_gradients": 2,
        "trackstar_index": 2,
        "train_outliers": 2,
        "hessians": 2,
        "proponents": 2,
    }
    for table in reruns.VECTOR_TABLES:
        assert lake.count_rows(table, [("checkpoint_id", "=", "old")]) == 0, table
        after = lake.read(table, filters=[("checkpoint_id", "=", "new")])
        assert after.sort_by("chunk" if "chunk" in after.column_names else "run_id").equals(
            before[table].sort_by("chunk" if "chunk" in after.column_names else "run_id")
        ), table
        assert _string_views(lake, table) == [], table
    assert not any((Path(lake.root) / "_autocorrelation" / "old").rglob("*.safetensors"))
    assert not any((Path(lake.root) / "_matrices" / "hessians" / "old").rglob("*.safetensors"))
    assert (Path(lake.root) / "_autocorrelation" / "new" / "f" / "m.safetensors").exists()
    assert (Path(lake.root) / "model" / "checkpoints" / "old").is_dir()  # the model itself stays
    (run,) = lake.read("runs", filters=[("command", "=", "keep-checkpoints")]).to_pylist()
    assert run["status"] == "succeeded" and json.loads(run["counts_json"])["dropped"] == ["old"]
    assert "dropped the vectors of old: rows train_gradients 4, query_gradients 2" in reruns.retention_lines(result)[1]
    assert [r["checkpoint_id"] for r in reruns.coverage(lake.root)] == ["new"]
    # a streamed replace of the rewritten files still works (it filters the slice key)
    lake.replace_slice_batches("proponents", [], query_set="x", method="x", checkpoint_id="new")
    assert lake.count_rows("proponents") == 0


def test_a_rerun_keeps_the_model_unless_its_corpus_changed_or_retrain_is_asked(user_files, tmp_path):
    from demo import reruns, train_model

    _, corpus, _, imported = user_files
    lake = tmp_path / "lake"
    shutil.copytree(imported, lake)
    assert not reruns.model_choice(str(lake), retrain=False).reuse  # nothing trained yet
    (lake / "model" / "tokenizer").mkdir(parents=True)
    (lake / "model" / "tokenizer" / "tokenizer.json").write_text("{}")
    (lake / "model" / "checkpoints" / "gpt2-n-s0-step000006").mkdir(parents=True)
    (lake / "model" / "checkpoints" / "gpt2-n-s0-step000006" / "config.json").write_text("{}")
    (lake / "model" / "checkpoints" / "gpt2-n-s0-step000006" / "tokenizer.json").write_text("{}")
    summary = {"checkpoints": ["gpt2-n-s0-step000006"], "partitions": train_model.trained_partitions(lake / "raw")}
    (lake / "model" / "train_summary.json").write_text(json.dumps(summary))

    choice = reruns.model_choice(str(lake), retrain=False)
    assert choice.reuse and choice.added == [] and "trained on this very corpus" in choice.reason
    assert not reruns.restore_tokenizer(str(lake), "gpt2-n-s0-step000006")
    (lake / "model" / "tokenizer" / "tokenizer.json").write_text('{"of": "a training that failed"}')
    assert reruns.restore_tokenizer(str(lake), "gpt2-n-s0-step000006")  # the kept checkpoint's tokenizer again
    assert (lake / "model" / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert not reruns.model_choice(str(lake), retrain=True).reuse
    grown = _corpus_with(tmp_path, corpus, "c4-train.00002-of-00003.json.gz", ONE_LINE)
    import_data.import_world(lake, grown, user_files[2])
    choice = reruns.model_choice(str(lake), retrain=False)
    assert choice.reuse and choice.added == ["c4-train.00002-of-00003.json.gz"]
    assert "1 partition(s) added since are indexed with it, not trained on; --retrain" in choice.reason
    del summary["partitions"]  # a model trained before summaries listed them: an import never changes a partition
    (lake / "model" / "train_summary.json").write_text(json.dumps(summary))
    assert reruns.model_choice(str(lake), retrain=False).reuse

    generated = tmp_path / "generated"  # the generated world, regenerated with other bytes: a new model
    shutil.copytree(corpus, generated / "raw")
    shutil.copytree(lake / "model", generated / "model")
    summary["partitions"] = train_model.trained_partitions(generated / "raw")
    (generated / "model" / "train_summary.json").write_text(json.dumps(summary))
    assert reruns.model_choice(str(generated), retrain=False).reuse
    first = sorted((generated / "raw").glob("c4-*.json.gz"))[0]
    _gzip_lines(first, ONE_LINE)
    choice = reruns.model_choice(str(generated), retrain=False)
    assert not choice.reuse and f"partition(s) {first.name} changed or are gone" in choice.reason


def _grown_corpus(corpus: Path, folder: Path) -> Path:
    """The user's corpus plus a third partition: the first partition's documents again, under new urls
    (a new crawl of the same sites)."""
    shutil.copytree(corpus, folder)
    with gzip.open(sorted(corpus.glob("c4-*.json.gz"))[0], "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    lines = [json.dumps(row | {"url": row["url"] + "?crawl=2"}) for row in rows]
    _gzip_lines(folder / "c4-train.00002-of-00003.json.gz", lines)
    return folder


def _slices(tables, table: str, keys: list[str]) -> dict:
    """{key values: sorted run ids} of a table's rows."""
    rows = tables.read(table, columns=[*keys, "run_id"])
    found: dict = {}
    for row in rows.to_pylist():
        found.setdefault(tuple(row[k] for k in keys), set()).add(row["run_id"])
    return {key: sorted(runs) for key, runs in found.items()}


@pytest.mark.slow
def test_a_second_day_indexes_only_the_new_partition_and_retrain_drops_the_old_vectors(
    user_files, tmp_path, monkeypatch
):
    """Day 1: `pipeline --corpus` (2 partitions) trains the tiny model and indexes everything. Day 2: one
    more partition: the same model and checkpoint, only partition 2 tokenized and extracted (every row of
    partitions 0 and 1 keeps its day-1 run id), then fit and score; coverage 100% on one tokenizer.
    Day 3: `--retrain --keep-checkpoints 1`: a new model (new ids, new tokenizer, every partition
    retokenized and extracted), and the old checkpoint's vectors dropped from every vector table."""
    from infra.lake import Lake
    from tests.fixtures import TINY

    _, corpus, queries, _ = user_files
    monkeypatch.setenv("TRACKSTAR_PROJECTION_K", "4")
    lake, home = tmp_path / "lake", str(tmp_path / ".airflow")
    small = dict(seeds=[0], variants=[], tail_patch_queries=2, projection_k=4)

    def day(corpus_dir, **options):
        return pipeline.run(
            str(lake),
            airflow_home=home,
            corpus=str(corpus_dir),
            queries=str(queries),
            name="days",
            train_overrides=TINY,
            evaluate_overrides=small,
            **options,
        )

    first = day(corpus)
    tables = Lake(lake)
    checkpoint = Path(first["checkpoint"]).name
    assert first["model"]["new"] and checkpoint.startswith("gpt2-days-s0-step")
    trained = (lake / "model" / "train_summary.json").read_bytes()
    folders = sorted(p.name for p in (lake / "model" / "checkpoints").iterdir())
    tokens, documents = _slices(tables, "tokens", ["partition"]), _slices(tables, "documents", ["partition"])
    vectors = _slices(tables, "train_gradients", ["checkpoint_id", "fingerprint", "partition"])
    runs = {r["run_id"] for r in tables.read("runs", columns=["run_id"]).to_pylist()}
    assert sorted(tokens) == [(0,), (1,)] and {p for _, _, p in vectors} == {0, 1}

    second = day(_grown_corpus(corpus, tmp_path / "grown"))
    assert not second["model"]["new"] and "1 partition(s) added since" in second["model"]["why"]
    assert Path(second["checkpoint"]).name == checkpoint
    assert (lake / "model" / "train_summary.json").read_bytes() == trained
    assert sorted(p.name for p in (lake / "model" / "checkpoints").iterdir()) == folders
    assert tables.distinct("checkpoints", ["checkpoint_id"]) == {(checkpoint,)}
    new_runs = [r for r in tables.read("runs").to_pylist() if r["run_id"] not in runs]
    (tokenize,) = [r for r in new_runs if r["command"] == "tokenize"]
    assert json.loads(tokenize["counts_json"])["tokenized"] == [2]
    extracted = [json.loads(r["counts_json"]) for r in new_runs if r["command"] == "extract"]
    assert extracted and all([i for i in c["items"] if i.startswith("train:")] == ["train:2"] for c in extracted)
    assert not [r for r in new_runs if r["command"] == "train-model"]
    # partitions 0 and 1: every row keeps its day-1 run; partition 2: one new run per table
    now = _slices(tables, "tokens", ["partition"])
    assert {k: v for k, v in now.items() if k != (2,)} == tokens and now[(2,)] == [tokenize["run_id"]]
    now = _slices(tables, "documents", ["partition"])
    assert {k: v for k, v in now.items() if k != (2,)} == documents and now[(2,)] == [tokenize["run_id"]]
    now = _slices(tables, "train_gradients", ["checkpoint_id", "fingerprint", "partition"])
    assert {k: v for k, v in now.items() if k[2] != 2} == vectors
    assert {k[:2] for k in now if k[2] == 2} == {k[:2] for k in vectors}  # every fingerprint got partition 2
    assert all(set(v) <= {r["run_id"] for r in new_runs} for k, v in now.items() if k[2] == 2)
    (row,) = [r for r in second["coverage"] if r["fingerprint"] == second["coverage"][0]["fingerprint"]]
    assert row["checkpoint_id"] == checkpoint and row["partitions"] == [0, 1, 2] and row["coverage"] == 1.0
    assert all(r["coverage"] == 1.0 and not r["stale_vectors"] for r in second["coverage"])
    assert not second["retention"]["applied"] and second["retention"]["dropped"] == []
    print(f"\nday 1 stages: {first['seconds']}\nday 2 stages: {second['seconds']}")

    third = day(tmp_path / "grown", retrain=True, keep_checkpoints=1)
    retrained = Path(third["checkpoint"]).name
    assert third["model"]["new"] and retrained.startswith("gpt2-days-v002-s0-step")
    assert third["retention"]["kept"] == [retrained] and third["retention"]["dropped"] == [checkpoint]
    for table in ("train_gradients", "query_gradients", "trackstar_index", "proponents", "hessians"):
        assert tables.count_rows(table, [("checkpoint_id", "=", checkpoint)]) == 0, table
        assert tables.count_rows(table, [("checkpoint_id", "=", retrained)]) > 0, table
    assert not any((lake / "_autocorrelation" / checkpoint).rglob("*.safetensors"))
    assert (lake / "model" / "checkpoints" / checkpoint).is_dir()
    fingerprints = {f for (f,) in tables.distinct("tokens", ["tokenizer_fingerprint"])}
    assert len(fingerprints) == 1 and {r["tokenizer"] for r in third["coverage"]} == fingerprints
    assert {r["checkpoint_id"] for r in third["coverage"]} == {retrained}
    assert all(r["coverage"] == 1.0 for r in third["coverage"])


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--retrain", "--checkpoint", "elsewhere"], "--retrain trains the small model; --checkpoint indexes yours"),
        (["--keep-checkpoints", "-1"], "--keep-checkpoints -1: give 0 (keep all) or more"),
    ],
)
def test_retrain_and_keep_checkpoints_refuse_what_they_cannot_do(user_files, tmp_path, capsys, options, problem):
    _, corpus, queries, _ = user_files
    err = _refused(capsys, tmp_path / "lake", "--corpus", corpus, "--queries", queries, *options)
    assert problem in err and not (tmp_path / "lake").exists()
