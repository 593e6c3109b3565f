"""infra/cli.py: every stage's flags come from its config declaration, with the settings' defaults."""

import argparse

import pytest

from infra.cli import add_config_arguments, config_from_args
from evaluation import evaluate
from jobs import extract, fit_hessian, index, score, tokenize


def parse(config_class, *argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_class)
    return config_from_args(config_class, parser.parse_args(list(argv)))


def test_no_flags_give_the_declared_defaults_and_the_settings(monkeypatch):
    monkeypatch.setenv("TRACKSTAR_LAKE_ROOT", "s3://bucket/lake")
    monkeypatch.setenv("TRACKSTAR_TOP_K", "7")
    monkeypatch.setenv("TRACKSTAR_HESSIAN_DAMPING", "0.25")
    monkeypatch.setenv("TRACKSTAR_CPU_THREADS", "3")
    for config_class in (
        evaluate.EvaluateConfig,
        extract.ExtractConfig,
        fit_hessian.FitHessianConfig,
        index.IndexConfig,
        score.ScoreConfig,
        tokenize.TokenizeConfig,
    ):
        assert parse(config_class) == config_class()  # the same object a DAG task or a caller makes
    assert parse(score.ScoreConfig).lake == "s3://bucket/lake" and parse(score.ScoreConfig).top_k == 7
    assert parse(fit_hessian.FitHessianConfig).damping_ratio == 0.25
    # the evaluation reads the settings too (it had its own lake, top_k and projection_k)
    assert (parse(evaluate.EvaluateConfig).lake, parse(evaluate.EvaluateConfig).top_k) == ("s3://bucket/lake", 7)
    assert parse(evaluate.EvaluateConfig, "--seeds", "4", "5").seeds == [4, 5]
    assert {parse(c).cpu_threads for c in (evaluate.EvaluateConfig, extract.ExtractConfig, score.ScoreConfig)} == {3}


def test_each_kind_of_field_parses_to_its_type():
    config = parse(
        extract.ExtractConfig,
        "--projection-k",
        "4",
        "--projection-seed",
        "3",
        "--partitions",
        "0",
        "2",
        "--force",
        "--normalizer",
        "none",
        "--query-set",
        "other",
    )
    assert (
        config.projection_k,
        config.projection_seed,
        config.partitions,
        config.force,
        config.normalizer,
        config.query_set,
    ) == (4, 3, [0, 2], True, "none", "other")
    fit = parse(fit_hessian.FitHessianConfig, "--lambda", "0.5", "--damping-rule", "mixed-global")
    assert (fit.mixing_lambda, fit.damping_rule, fit.r_query_exclude) == (0.5, "mixed-global", ())
    scored = parse(score.ScoreConfig, "--methods", "trackstar", "trak", "--top-k", "3", "--checkpoint-id", "c1")
    assert (scored.methods, scored.top_k, scored.checkpoint_id) == (["trackstar", "trak"], 3, "c1")
    assert parse(tokenize.TokenizeConfig, "--context", "64").context == 64


@pytest.mark.parametrize("argv", [["--methods", "nope"], ["--top-k", "many"], ["--prompt-index", "5"], ["--methods"]])
def test_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(score.ScoreConfig, *argv)
    assert exit_.value.code == 2 and "error" in capsys.readouterr().err
