"""`python -m jobs <command>`: one entry point for every pipeline stage.

Each command lives in its own module with `add_arguments(parser)` and `main(args)`;
modules are imported only when their command runs, so `--help` stays fast.
"""

import argparse
import importlib
import os
import sys

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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or a usage error and exits
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    command_parser = argparse.ArgumentParser(prog=f"python -m jobs {name}", description=help_text)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(rest)
    try:
        return module.main(args) or 0
    except InvalidName as error:  # a usage error, not a crash: no traceback
        command_parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
