"""The whole pipeline, end to end: on the embedded default (`make run`) or on a user's own data.

    python -m jobs pipeline                                              # the embedded fact world
    python -m jobs pipeline --corpus DIR --queries FILE [--checkpoint DIR] [--name NAME]   # your own data
    python -m jobs pipeline --lake LAKE --repair-import                  # a lake an import left half-written

Build the fact world, or import the user's C4 partitions and queries (`demo.import_data`: every
check runs before anything is written, so a refused import leaves the lake as it was); train the
small model, unless a checkpoint folder is given (then it is linked into the lake with its
tokenizer); register the queries; run the nightly `trackstar_reindex` DAG with a project-local
Airflow (`.airflow/`, SQLite): tokenize → extract → fit the Hessian → score; then the evaluation
(all methods, MRR, recall@10, tail-patch, report under `<lake>/reports/<run>/`, `latest` pointing
at the newest). A second run finds nothing new to index.

Reruns are incremental (`demo.reruns`): the model the lake holds is kept (its tokenizer and
checkpoints), so a rerun that added partitions tokenizes only those and extracts only their slices
for the same checkpoint, then refits and rescores. `--retrain` trains a new model on the whole
corpus (new checkpoint ids, `gpt2-<name>-v002-...`, indexed from scratch with its own tokenizer);
then `--keep-checkpoints N` (default 2; 0: all) keeps the vectors of the newest N checkpoints and
drops the others', and says so (on a run without a new model only when given: a rerun never drops
what a backfill extracted unasked). The run ends with the coverage per tokenizer and checkpoint: chunks
retokenized by another tokenizer are never counted as covered by an older checkpoint's vectors.

Names come from the user: `--name` (default: the corpus folder's name made a valid name, or
`fact-world` for the embedded world) names the query set, prefixes the trained checkpoints
(`gpt2-<name>-s0-step…`) and titles the report.

Nothing the pipeline did not create is deleted: on a lake holding imported data, the embedded
default refuses to run (it would regenerate the world over it) and says how to rerun on that data.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from infra import storage
from demo import import_data, model_eval, reruns, train_model, world
from evaluation import evaluate
from evaluation.rankings import projections
from evaluation.report import magnitude
from evaluation.summary import table
from jobs import register_queries
from jobs.catalog import newest_checkpoint_folder
from jobs.checkpoints import optimizer_state_source
from infra.cli import add_config_arguments, config_from_args, option
from infra.config import from_settings, load_config
from infra import layout


def run(
    lake: str,
    world_seed: int = 0,
    airflow_home: str = ".airflow",
    reports: str = "",
    corpus: str | None = None,
    queries: str | None = None,
    checkpoint: str | None = None,
    name: str | None = None,
    train_overrides: dict | None = None,
    evaluate_overrides: dict | None = None,
    retrain: bool = False,
    keep_checkpoints: int | None = None,
    world_options: dict | None = None,
) -> dict:
    """`reports`: the report's folder (default `<lake>/reports/<run>/`); `train_overrides`,
    `evaluate_overrides`, `world_options`: fields of TrainConfig / EvaluateConfig / WorldOptions (the
    embedded world's kind); `retrain`: train a new model even though the lake holds one;
    `keep_checkpoints`: the retention policy (`demo.reruns.keep_newest`, 0 keeps every checkpoint's
    vectors), applied when this run trains or links a new model (None: the setting), or when given."""
    refuse_option_clashes(lake, corpus, queries, checkpoint, retrain, keep_checkpoints, world_options)
    name = import_data.check_name(
        name or (import_data.name_from(Path(corpus).resolve().name) if corpus else load_config().query_set)
    )
    stages = Stages()
    world_summary, linked = build_corpus(stages, lake, world_seed, corpus, queries, checkpoint, name, world_options)
    if checkpoint:
        model = link_model(stages, lake, checkpoint, linked)
    else:
        model = train_or_keep_model(stages, lake, world_seed, name, retrain, train_overrides)
    queries_file = layout.world(lake, "queries.jsonl")
    accuracy = stages("model-accuracy", lambda: model_eval.evaluate_checkpoint(model.checkpoint, queries_file))
    # the user's own file, so that refusals name its lines
    stages("register-queries", lambda: register_queries.run(lake, queries, name=name))
    evaluation = evaluation_config(lake, reports, model.checkpoint, name, evaluate_overrides)
    dag = reindex(stages, lake, model.checkpoint, airflow_home, projections(evaluation, model.checkpoint))
    report = stages("evaluate", lambda: evaluate.run(evaluation))
    retention = keep_checkpoints_stage(stages, lake, keep_checkpoints, model, report["checkpoint_id"])
    coverage = reruns.coverage(lake)

    summary = {
        "world": vars(world_summary),
        "checkpoint": str(model.checkpoint),
        "model": {"new": model.new, "why": model.why},
        "accuracy": accuracy.as_dict(),
        "dag": {k: v for k, v in dag.items() if k != "log"},
        "evaluation": report["methods"],
        "retention": retention,
        "coverage": coverage,
        "seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
    }
    storage.write_text(storage.join(lake, "pipeline_summary.json"), json.dumps(summary, indent=2, default=str))
    print(f"\n=== TrackStar lake: {'your data' if corpus else 'embedded run'} ===")
    print_summary(lake, world_summary, model, accuracy, dag, report, retention, coverage, stages.seconds)
    return summary


def keep_checkpoints_stage(stages, lake: str, keep_checkpoints: int | None, model, checkpoint_id: str) -> dict:
    """The retention policy (the setting unless given), applied when this run trained or linked a
    new model, or when it was given."""
    keep = load_config().keep_checkpoints if keep_checkpoints is None else keep_checkpoints
    applied = model.new or keep_checkpoints is not None
    retention = stages("keep-checkpoints", lambda: reruns.keep_newest(lake, keep, checkpoint_id, applied=applied))
    for line in reruns.retention_lines(retention):
        print(f"[keep-checkpoints] {line}")
    return retention


class Stages:
    """Runs the pipeline's stages one at a time, printing each one's name and keeping its seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, stage_name: str, fn):
        started = time.time()
        print(f"\n--- {stage_name}", flush=True)
        result = fn()
        self.seconds[stage_name] = time.time() - started
        return result


@dataclass
class Model:
    """The model a run indexes: its final checkpoint, whether this run trained or linked it, why."""

    checkpoint: Path
    new: bool
    why: str
    line: str  # the summary's line about it


def refuse_option_clashes(
    lake, corpus, queries, checkpoint, retrain: bool, keep_checkpoints: int | None, world_options: dict | None = None
) -> None:
    if corpus and world_options and world.WorldOptions(**world_options) != world.WorldOptions():
        raise import_data.ImportRefused(lake, ["the world's options shape the embedded world, not your own data"])
    if (corpus or queries) and not (corpus and queries):
        raise import_data.ImportRefused(lake, ["your own data needs both --corpus and --queries"])
    if retrain and checkpoint:
        raise import_data.ImportRefused(
            lake, ["--retrain trains the small model; --checkpoint indexes yours: not both"]
        )
    if keep_checkpoints is not None and keep_checkpoints < 0:
        raise import_data.ImportRefused(lake, [f"--keep-checkpoints {keep_checkpoints}: give 0 (keep all) or more"])


def build_corpus(
    stages: Stages,
    lake: str,
    world_seed: int,
    corpus,
    queries,
    checkpoint,
    name: str,
    world_options: dict | None = None,
):
    """(the world's or the import's summary, the checkpoint folder to link as `check_checkpoint` found
    it, or None): the user's data imported, or the embedded world built (of `world_options`' kind)."""
    linked = None
    if corpus:
        # every check first (corpus, queries, urls, checkpoint, tokenizer): a refusal writes nothing
        plan = stages(
            "check-import", lambda: import_data.check_import(lake, corpus, queries, checkpoint=checkpoint, name=name)
        )
        linked = plan.checkpoint
        world_summary = stages("import", lambda: import_data.write_import(plan))
        for note in world_summary.notes:
            print(f"[import] {note}")
    else:
        if checkpoint:
            linked = import_data.check_checkpoint(lake, checkpoint)
        world_config = world.WorldConfig(out_dir=lake, world_seed=world_seed, **(world_options or {}))
        world_summary = stages("world", lambda: world.run(world_config))
    print(
        f"[{'import' if corpus else 'world'}] {world_summary.documents:,} documents in {world_summary.partitions} "
        f"partitions, {world_summary.queries} queries; name {name!r}"
    )
    return world_summary, linked


def link_model(stages: Stages, lake: str, checkpoint: str, linked: dict) -> Model:
    """The user's checkpoint folder, linked into the lake with its tokenizer."""
    new_model = not linked["target"].exists()  # a checkpoint folder this lake did not index before
    final_checkpoint = stages("import-checkpoint", lambda: import_data.link_checkpoint(linked, lake))
    state = optimizer_state_source(final_checkpoint)
    model_line = (
        f"{final_checkpoint.name}, linked from {Path(checkpoint).resolve()}; optimizer state: "
        f"{state or 'none (indexed without the optimizer correction)'}"
    )
    print(f"[import-checkpoint] {model_line}")
    return Model(final_checkpoint, new_model, f"linked from {Path(checkpoint).resolve()}", model_line)


def train_or_keep_model(
    stages: Stages, lake: str, world_seed: int, name: str, retrain: bool, train_overrides: dict | None
) -> Model:
    """The small model: the lake's own kept (`demo.reruns.model_choice`), else a new one trained."""
    choice = reruns.model_choice(lake, retrain)
    print(f"[train-model] {choice.reason}", flush=True)
    if choice.reuse:
        trained = choice.summary
        if reruns.restore_tokenizer(lake, trained["checkpoints"][-1]):
            print(f"[train-model] the lake's tokenizer was not {trained['checkpoints'][-1]}'s: restored from it")
    else:
        train_config = train_model.TrainConfig(lake=lake, seed=world_seed, **(train_overrides or {}))
        train_config = replace(train_config, model_tag=model_tag(lake, name, train_config))
        trained = stages("train-model", lambda: train_model.run(train_config))
    new_model = trained["checkpoints"] != (choice.summary or {}).get("checkpoints")
    model_line = (
        f"GPT-2, {trained['parameters']:,} parameters, {trained['steps']} steps in "
        f"{trained['train_seconds']}s on 2 CPU ranks (DeepSpeed ZeRO-2); checkpoints "
        f"{', '.join(trained['checkpoints'])}" + (" (kept from an earlier run)" if choice.reuse else "")
    )
    why = choice.reason if new_model or choice.reuse else "the model was already trained on this corpus"
    return Model(train_model.final_checkpoint(lake, trained), new_model, why, model_line)


def reindex(stages: Stages, lake: str, final_checkpoint: Path, airflow_home: str, also: list[dict]) -> dict:
    """The nightly `trackstar_reindex` DAG run once by the project-local Airflow; raises unless it
    succeeded. `also`: the evaluation's other projections, extracted by the DAG's ranks with the index."""
    from infra.airflow_local import run_dag

    dag_checkpoint = storage.name(newest_checkpoint_folder(load_config().checkpoints or layout.checkpoints(lake)))
    if dag_checkpoint != final_checkpoint.name:  # e.g. a retrained model with fewer steps than the old one
        print(
            f"[pipeline] WARNING: the reindex DAG indexes the checkpoint with the highest step, {dag_checkpoint}; "
            f"the evaluation below extracts {final_checkpoint.name} on its own",
            flush=True,
        )
        also = []
    conf = {"also_extract": also}
    dag = stages(
        "airflow: trackstar_reindex",
        lambda: run_dag("trackstar_reindex", storage.absolute(lake), conf=conf, home=airflow_home),
    )
    print(
        "\n".join(
            line for line in dag["log"].splitlines() if line.startswith(("[reindex]", "trackstar_reindex run", "  "))
        )
    )
    if dag["state"] != "success":
        raise RuntimeError(f"trackstar_reindex ended {dag['state']}; see the task log above")
    return dag


def evaluation_config(
    lake: str, reports: str, final_checkpoint: Path, name: str, overrides: dict | None
) -> evaluate.EvaluateConfig:
    """The evaluation of the run's checkpoint, with the settings' top_k and projection_k. Without
    optimizer state the index has no correction and the tail-patch steps by plain SGD (the report
    says so)."""
    settings = load_config()
    config = evaluate.EvaluateConfig(
        lake=lake,
        reports=reports,
        checkpoint=str(final_checkpoint),
        query_set=name,
        top_k=settings.top_k,
        projection_k=settings.projection_k,
    )
    return replace(config, **(overrides or {}))


def print_summary(lake, world_summary, model: Model, accuracy, dag, report, retention, coverage, seconds) -> None:
    """What the run built, its model, the evaluation, retention and coverage, and what to do next."""
    print(f"lake:        {storage.absolute(lake)}")
    print(
        f"corpus:      {world_summary.documents:,} documents ({world_summary.words:,} words) in "
        f"{world_summary.partitions} C4 partitions; {world_summary.facts} facts, {world_summary.queries} queries"
    )
    print(f"model:       {model.line}")
    print(accuracy.table())
    print(f"airflow:     trackstar_reindex {dag['state']}: " + ", ".join(f"{t} {s}" for t, s in dag["tasks"].items()))
    print(
        f"\nfact tracing on checkpoint {report['checkpoint_id']} (λ = {magnitude(report['lambda'])}; "
        f"tail-patch over {report['tail_patch_queries']} queries, {report['tail_patch_step']}):"
    )
    print(table(report))
    print(f"\nreport:      {storage.join(report['report_dir'], 'eval.html')}")
    print("retention:   " + "\n             ".join(reruns.retention_lines(retention)))
    print("coverage:    train chunks with a vector, per tokenizer and checkpoint")
    for line in reruns.coverage_lines(coverage):
        print(f"             {line}")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    print("next:        .venv/bin/python -m jobs sql --list        (SQL over the Delta tables)")
    print("             make airflow-ui                            (the DAGs in the Airflow UI, 127.0.0.1:8080)")
    print(f"explorer:    .venv/bin/python -m jobs explore --lake {lake}   (then open http://127.0.0.1:8765/)")


def model_tag(lake: str, name: str, config: train_model.TrainConfig) -> str:
    """What the trained checkpoints' ids start with: `gpt2-<name>`; when the lake holds checkpoints of
    that name trained on another corpus (`--retrain` after partitions were added), `gpt2-<name>-v002`, `-v003`, ...:
    the retrained model's checkpoints are new checkpoints beside the old ones (never the old ids
    with other weights, which extract refuses) and, at the same step, sort after them, so the DAG's
    newest checkpoint is the retrained one. A rerun with nothing new keeps the model and its tag."""
    import re

    base = f"gpt2-{name}"
    summary = Path(layout.train_summary(lake))
    if storage.is_s3(lake) or not summary.exists():
        return base
    previous = json.loads(summary.read_text())
    last = re.sub(r"-s\d+-step\d+$", "", (previous.get("checkpoints") or [base])[-1])
    if last == base or re.fullmatch(rf"{re.escape(base)}-v\d{{3}}", last):
        if previous.get("input_digest") == train_model.input_digest(
            Path(lake) / "raw", replace(config, model_tag=last)
        ):
            return last  # trained on this very corpus and configuration: train-model keeps it
    ours = re.compile(rf"{re.escape(base)}(?:-v(\d{{3}}))?-s\d+-step\d+")
    versions = [int(m.group(1) or 1) for p in layout.checkpoints_path(lake).glob("*") if (m := ours.fullmatch(p.name))]
    return f"{base}-v{max(versions) + 1:03d}" if versions else base


@dataclass
class PipelineConfig:
    """The command line of `pipeline` (`run` takes the same as arguments, and more for tests)."""

    lake: str = from_settings("lake_root", help="lake root: a folder, or s3://bucket/prefix for the embedded world")
    world_seed: int = from_settings("world_seed", help="seed of the embedded world")
    airflow_home: str = option(".airflow", help="the project-local Airflow's home")
    reports: str = option("", help="folder of the report (empty: <lake>/reports/<run>/, with <lake>/reports/latest)")
    corpus: str | None = option(
        None, help="your own C4 partitions (a folder of c4-*.json.gz) instead of the embedded world"
    )
    queries: str | None = option(None, help="your own queries JSONL (format: README, 'Your own data')")
    checkpoint: str | None = option(None, help="a Hugging Face causal LM folder to index instead of training one")
    name: str | None = option(
        None,
        help="names the query set, the trained checkpoints (gpt2-<name>-...) and the report (empty: the corpus "
        "folder's name made a valid name, or the setting query_set for the embedded world)",
    )
    retrain: bool = option(
        False,
        help="train a new model on the whole corpus (new checkpoint ids), although the lake holds one; "
        "without it a rerun keeps the model and indexes only what is new",
    )
    keep_checkpoints: int | None = option(
        None,
        help="after the run, keep the vectors of the newest N checkpoints (the one just indexed first) and drop "
        "the others' (train_gradients, query_gradients, trackstar_index, train_outliers, hessians, proponents); "
        "0 keeps all. Default: the setting keep_checkpoints, applied when the run trains or links a new model; "
        "given, applied on any run",
    )
    repair_import: bool = option(
        False, help="move aside the raw partitions no import recorded (an interrupted or refused import), then stop"
    )


def add_arguments(parser: argparse.ArgumentParser):
    add_config_arguments(parser, PipelineConfig)
    add_config_arguments(parser.add_argument_group("the embedded world's kind (demo/world.py)"), world.WorldOptions)


def main(args):
    """Refusals (ImportRefused, ImportedDataError, a bad --name) reach `python -m jobs`, which prints
    them in one line plus their problems and exits 2."""
    config = config_from_args(PipelineConfig, args)
    if config.repair_import:
        if config.corpus or config.queries or config.checkpoint:
            raise import_data.ImportRefused(config.lake, ["--repair-import runs alone: repair, then rerun your import"])
        for line in import_data.repair_import(config.lake):
            print(f"[repair-import] {line}")
        return 0
    world_options = asdict(config_from_args(world.WorldOptions, args))
    run(
        **{name: value for name, value in asdict(config).items() if name != "repair_import"},
        world_options=world_options,
    )
    return 0
