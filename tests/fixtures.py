"""Session fixtures shared by the test modules (registered with `-p tests.fixtures` in pytest.ini).

A small generated world and a tiny GPT-2 really trained by DeepSpeed on 2 CPU ranks: the slowest
set-up of the suite, so it runs once per session and test modules copy the lake before writing.
"""

import shutil

import pytest

from demo import train_model, world

TINY = dict(
    n_layer=2,
    n_embd=32,
    n_head=2,
    context=64,
    vocab_size=512,
    micro_batch=4,
    max_steps=6,
    warmup_steps=2,
    checkpoint_fractions=(0.5, 1.0),
)


WORLD = dict(world_seed=1, facts_per_bucket=2, n_partitions=2)


def _train(tmp_path_factory, optimizer):
    lake = tmp_path_factory.mktemp(f"lake-{optimizer}")
    world.run(world.WorldConfig(out_dir=str(lake), **WORLD))
    summary = train_model.run(train_model.TrainConfig(lake=str(lake), optimizer=optimizer, **TINY))
    return lake, summary


@pytest.fixture(scope="session")
def adam_run(tmp_path_factory):
    return _train(tmp_path_factory, "adam")


@pytest.fixture(scope="session")
def adafactor_run(tmp_path_factory):
    return _train(tmp_path_factory, "adafactor")


def copy_lake(source, destination):
    """A private copy of a trained lake (world, model, checkpoints) for a test that writes tables."""
    shutil.copytree(source, destination)
    return destination


def running_ranks() -> list:
    """This process's extraction ranks still alive (none once a job returned)."""
    import psutil

    def is_rank(process):
        try:
            command = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            return False
        return "jobs.extract_rank" in command

    return [p for p in psutil.Process().children(recursive=True) if is_rank(p)]
