"""bench/world_family.py's summarising and rendering on hand-made eval.json-like reports (no training)."""

import json

from bench import world_family


def _report(
    correction=(0.02, 0.001, 0.04), ratios=(3.0, 2.5, 3.5), mrr=(0.4, 0.7), trak=0.1, trak_minus=(0.2, 0.1, 0.3)
):
    """The parts of an eval.json the bench reads: TrackStar's tail-patch is 0.3."""
    methods = {
        "bm25": {"mrr": mrr[1], "tail_patch": 0.1},
        "trak": {"mrr": 0.2, "tail_patch": trak},
        "trackstar-no-optimizer": {"mrr": 0.38, "tail_patch": 0.28},
        "trackstar-no-hessian": {"mrr": 0.3, "tail_patch": 0.2},
        "trackstar-adam-exact": {"mrr": 0.4, "tail_patch": 0.5},  # a variant, not an ablation
        "trackstar": {"mrr": mrr[0], "tail_patch": 0.3},
    }
    return {
        "methods": methods,
        "trackstar_minus": {
            "trackstar-no-optimizer": {"tail_patch": list(correction)},
            "trak": {"tail_patch": list(trak_minus)},
            "trackstar-adam-exact": {"tail_patch": [-0.2, -0.3, -0.1]},
        },
        "trackstar_over_bm25_tail_patch": {"delta_log_prob": list(ratios), "delta_prob": [r - 0.5 for r in ratios]},
    }


def test_a_world_row_and_the_aims():
    good = world_family.world_row("default", 101, "adam", _report())
    assert good["correction_tail_patch"] == [0.02, 0.001, 0.04]
    assert good["trackstar_over_bm25_delta_prob"] == [2.5, 2.0, 3.0]
    assert (good["mrr_trackstar"], good["mrr_bm25"]) == (0.4, 0.7)
    assert good["trackstar_below"] == []  # the variant above it is not an ablation
    assert good["trackstar_at_least_ablations_and_trak"] and good["significantly_above_trackstar"] == []
    # a variant's difference is turned around: the variant − the default, its interval with it
    assert good["variants_minus_default"] == {"trackstar-adam-exact": [0.2, 0.1, 0.3]}
    assert "trackstar-adam-exact − default: +0.2000 [+0.1000, +0.3000]" in world_family.table([good])
    lines = world_family.aims([good])
    assert len(lines) == 5 and all(line.startswith("aim: ") and line.endswith("(met)") for line in lines)

    bad = world_family.world_row(
        "alt-vocab",
        104,
        "adafactor",
        _report(correction=(-0.01, -0.02, 0.0), ratios=(1.5, 1.0, 2.0), trak=0.4, trak_minus=(-0.1, -0.15, -0.05)),
    )
    assert bad["trackstar_below"] == ["trak"] and not bad["trackstar_at_least_ablations_and_trak"]
    assert bad["significantly_above_trackstar"] == ["trak"]
    lines = world_family.aims([good, bad])
    assert all(line.endswith("(not met)") for line in lines[:4]) and lines[4].endswith("(met)")
    assert "measured -0.0200" in lines[0] and "measured +1.5000" in lines[1]
    assert "measured 1 of 2 (by point estimate: 1)" in lines[3]
    # above by its point estimate only (the paired interval holds 0): not beyond the interval
    level = world_family.world_row("x", 1, "adam", _report(trak=0.4, trak_minus=(-0.1, -0.2, 0.01)))
    assert level["trackstar_below"] == ["trak"] and level["significantly_above_trackstar"] == []
    assert world_family.aims([good, level])[3].endswith("(met)")
    assert world_family.aims([good, world_family.world_row("x", 1, "adam", _report(mrr=(0.8, 0.7)))])[4].endswith(
        "(not met)"
    )
    # a correction variant's own effect (against no correction) is shown and judged by the same aim
    report = _report() | {
        "correction_effects": {"trackstar": [0.02, 0.001, 0.04], "trackstar-adam-exact": [0.22, -0.01, 0.4]}
    }
    measured = world_family.world_row("default", 101, "adam", report)
    assert measured["correction_effects"] == {"trackstar-adam-exact": [0.22, -0.01, 0.4]}
    assert "its own correction effect +0.2200 [-0.0100, +0.4000]" in world_family.table([measured])
    lines = world_family.aims([good, measured])
    assert lines[4] == (
        "aim: trackstar-adam-exact's own correction effect, 95% lower bound, the 1 world(s) measuring it ≥ -0.005: "
        "measured -0.0100 (not met)"
    )


def test_the_family_and_the_evaluation_arguments(tmp_path):
    args, evaluate_args = world_family.parse(["--worlds", "3", "--optimizers", "adam", "--", "--variants", "x"])
    assert world_family.family(args) == [
        ("default", 101, "adam"),
        ("paraphrase", 102, "adam"),
        ("mixed-heavy-distractors", 103, "adam"),
    ]
    assert evaluate_args == ["--variants", "x"]
    one, _ = world_family.parse(["--presets", "default", "--seeds", "106", "--optimizers", "adam"])
    assert world_family.family(one) == [("default", 106, "adam")]  # not five copies of it
    config = world_family.evaluate_config(tmp_path, 101, [])
    assert (config.seeds, config.variants, config.tail_patch_queries) == ([101], [], 40)
    assert config.reports == str(tmp_path / "reports")
    config = world_family.evaluate_config(
        tmp_path, 101, ["--variants", "trackstar-adam-exact", "--tail-patch-queries", "80"]
    )
    assert (config.variants, config.tail_patch_queries) == (["trackstar-adam-exact"], 80)


def test_rendering_from_json_prints_the_table_aims_and_draws_the_picture(tmp_path, capsys):
    rows = [
        world_family.world_row(p, s, o, _report())
        for p, s, o in (("default", 101, "adam"), ("paraphrase", 102, "adafactor"))
    ]
    (tmp_path / "world_family.json").write_text(json.dumps({"worlds": rows}))
    world_family.main(["--from-json", str(tmp_path / "world_family.json")])
    printed = capsys.readouterr().out
    assert "paraphrase" in printed and "+0.0200 [+0.0010, +0.0400]" in printed
    assert printed.count("aim: ") == 5
    assert (tmp_path / "world_family.png").stat().st_size > 1000
