"""`python -m jobs <command>`: one entry point for every pipeline stage.

Each command lives in its own module with `add_arguments(parser)` and `main(args)`;
modules are imported only when their command runs, so `--help` stays fast.
"""

import argparse
import importlib
import os
import sys

from infra.cli import DefaultsHelp
from infra.names import InvalidName

# Nothing can be fetched from a model hub here: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# command -> (module, one-line help)
COMMANDS = {
    "world": ("demo.world", "generate the embedded fact world (C4-format corpus, KB, queries) or import one"),
    "train-model": ("demo.train_model", "train the tokenizer and a small GPT-2 with DeepSpeed; save checkpoints"),
    "tokenize": ("jobs.tokenize", "validate raw C4 partitions and tokenize them into documents/tokens (Spark)"),
    "register-queries": ("jobs.register_queries", "load a queries JSONL into the queries / query_sets tables"),
    "extract": ("jobs.extract", "projected gradients of training chunks and queries for one checkpoint (DeepSpeed)"),
    "fit-hessian": ("jobs.fit_hessian", "fit R_train, R_query, λ and the damped inverse root for a checkpoint"),
    "index": (
        "jobs.index",
        "build the TrackStar index: train vectors preconditioned and normalised once, int8 + 1-bit sketch",
    ),
    "score": ("jobs.score", "exact top-k proponents per query from train_gradients (Spark)"),
    "trace": (
        "explorer.trace",
        "proponents of any prompt and target, scored on the fly, with the words that carry them",
    ),
    "evaluate": ("evaluation.evaluate", "MRR, recall@10, tail-patch and proponent categories per method; HTML report"),
    "takedown": ("jobs.takedown", "remove documents by url from every derived table; correct R_train, refit, rescore"),
    "changes": (
        "jobs.document_changes",
        "documents new, changed and deleted since a version of the table (its Delta change feed)",
    ),
    "verify": ("jobs.verify", "read every table and matrix file back in full; name each corrupted file and row"),
    "sql": ("jobs.sql", "run a documented SQL query over the lake's Delta tables with Spark (--list to see them)"),
    "explore": ("explorer.explore", "web page of queries and their proponents, served from the lake (127.0.0.1)"),
    "pipeline": (
        "demo.pipeline",
        "every stage end to end: the embedded default (`make run`), or --corpus/--queries [--checkpoint] of your own",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# The errors that refuse a user's input or the lake's state (never a bug's): module -> class names.
# A class counts only once its module is imported (no error of it can exist before), so `--help` stays fast.
REFUSALS = {
    "infra.names": ("InvalidName",),
    "infra.lake": ("LakeError", "TableNotFoundError"),
    "infra.config": ("ConfigError",),
    "infra.matrices": ("ChecksumMismatch",),
    "schemas.queries": ("QueryFileError",),
    "schemas.tables": ("SchemaVersionError",),
    "schemas.vectors": ("CorruptVector", "VectorOverflow"),
    "jobs.checkpoints": ("CheckpointError", "CheckpointMismatch"),
    "jobs.catalog": ("NotInLake",),
    "jobs.tokenize": ("RawPartitionError",),
    "gradient_kernels.scoring": ("FingerprintMismatch",),
    "demo.import_data": ("ImportRefused", "ImportedDataError"),
}


def is_refusal(error: BaseException) -> bool:
    """A project refusal (REFUSALS), or a FileNotFoundError the project raised with its own sentence
    (no errno: a missing input it looked for); a missing file the OS reported keeps its traceback."""
    if isinstance(error, FileNotFoundError) and error.errno is None:
        return True
    classes = [
        getattr(sys.modules[module], name)
        for module, names in REFUSALS.items()
        if module in sys.modules
        for name in names
        if hasattr(sys.modules[module], name)
    ]
    return isinstance(error, tuple(classes))


def report_refusal(command: str, error: BaseException) -> None:
    """`error: <one line>` on stderr, then the list of problems (the error's `problems`, else the rest
    of its message), each on its own line."""
    first, *rest = str(error).splitlines() or [type(error).__name__]
    problems = getattr(error, "problems", None) or [line.strip() for line in rest if line.strip()]
    lines = [f"error: {command}: {first.rstrip(':')}"] + [f"  - {problem}" for problem in problems]
    print("\n".join(lines + ["(python -m jobs --debug ... shows the traceback)"]), file=sys.stderr)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug, anywhere before a `--`: refusals keep their traceback
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if not (i < end and a == "--debug")]
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or a usage error and exits
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    command_parser = argparse.ArgumentParser(
        prog=f"python -m jobs {name}", description=help_text, formatter_class=DefaultsHelp
    )
    module.add_arguments(command_parser)
    args = command_parser.parse_args(rest)
    try:
        return module.main(args) or 0
    except InvalidName as error:  # a usage error, not a crash: no traceback
        if debug:
            raise
        command_parser.error(str(error))
    except Exception as error:  # a refusal is one line and its problems; anything else is a bug: traceback
        if debug or not is_refusal(error):
            raise
        report_refusal(name, error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
