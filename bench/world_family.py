"""Findings over a family of generated worlds: the full evaluation on several worlds (presets of
demo/world.py × world seeds that no test uses) and both optimizers (AdamW, Adafactor), each world
and model in its own lake under --out (bench/fidelity_seeds.py's `evaluate_lake`).

Per world and optimizer it collects: the optimizer correction's paired effect on tail-patch Δlog p
(full TrackStar minus TrackStar without it: mean and 95% interval), the TrackStar / BM25 tail-patch
ratios in Δlog p and Δp (with their intervals), the MRR of TrackStar and of BM25, and whether full
TrackStar's tail-patch Δlog p is at least every ablation's (`trackstar-no-*`) and TRAK's. Prints a
table and `aim:` lines, writes <out>/world_family.json and <out>/world_family.png.

    .venv/bin/python bench/world_family.py                       # 5 worlds x 2 optimizers, ~35 min
    .venv/bin/python bench/world_family.py --worlds 1 --optimizers adam          # one world
    .venv/bin/python bench/world_family.py -- --variants trackstar-adam-exact     # after --: evaluate's
    .venv/bin/python bench/world_family.py --from-json reports/world-family/world_family.json

The worlds are smaller than the embedded default so that one world, its model and its evaluation
take about 3 minutes on 2 cores (mixed-heavy-distractors, the largest, 3.9 min: 2.4 training, 1.5
the rest): 16 facts per bucket (80 queries, ~2,800-4,000 documents),
16 epochs as `make run` trains, one projection seed (the world's), 40 tail-patch queries and no
variants of the evaluation (pass `-- --variants ...` to measure them). A world whose eval.json
exists is kept (rerun to resume); `--from-json` only re-renders. Run it from the repository root:
the training ranks import the project from the working directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fidelity_seeds import evaluate_lake  # noqa: E402
from demo import train_model, world  # noqa: E402
from evaluation import evaluate  # noqa: E402
from evaluation.config import VARIANTS  # noqa: E402
from infra.cli import config_from_args  # noqa: E402

# one world per preset by default: the wording, the names, the statements and the distractors varied
PRESETS = ("default", "paraphrase", "mixed-heavy-distractors", "alt-vocab", "alt-templates")
FIRST_SEED = 101  # the tests' worlds use seeds below 20
CORRECTION_AIM, RATIO_AIM = -0.005, 2.0


def world_lake(out: Path, preset: str, seed: int, optimizer: str) -> Path:
    return out / f"{preset}-s{seed}-{optimizer}"


def evaluate_config(lake: Path, seed: int, evaluate_args: list[str]) -> evaluate.EvaluateConfig:
    """The bench's evaluation settings, then the arguments given after `--` (a later flag wins)."""
    parser = argparse.ArgumentParser(prog="evaluate")
    evaluate.add_arguments(parser)
    ours = ["--lake", str(lake), "--reports", str(lake / "reports"), "--seeds", str(seed)]
    args = parser.parse_args(ours + ["--tail-patch-queries", "40", "--variants", *evaluate_args])
    return config_from_args(evaluate.EvaluateConfig, args)


def evaluate_world(out: Path, preset: str, seed: int, optimizer: str, facts_per_bucket: int, evaluate_args) -> dict:
    lake = world_lake(out, preset, seed, optimizer)
    return evaluate_lake(
        world.WorldConfig(out_dir=str(lake), world_seed=seed, preset=preset, facts_per_bucket=facts_per_bucket),
        train_model.TrainConfig(lake=str(lake), seed=seed, optimizer=optimizer),
        evaluate_config(lake, seed, evaluate_args),
    )


def world_row(preset: str, seed: int, optimizer: str, report: dict) -> dict:
    """One world's findings from its eval.json."""
    methods, versus = report["methods"], report["trackstar_minus"]
    full = methods["trackstar"]["tail_patch"]
    rivals = [m for m in methods if m.startswith("trackstar-no-") or m == "trak"]
    ratios = report.get("trackstar_over_bm25_tail_patch", {})
    return {
        "preset": preset,
        "seed": seed,
        "optimizer": optimizer,
        "correction_tail_patch": versus["trackstar-no-optimizer"]["tail_patch"],  # (mean, low, high)
        "trackstar_over_bm25_delta_log_prob": ratios.get("delta_log_prob"),
        "trackstar_over_bm25_delta_prob": ratios.get("delta_prob"),
        "mrr_trackstar": methods["trackstar"]["mrr"],
        "mrr_bm25": methods["bm25"]["mrr"],
        "trackstar_tail_patch": full,
        # the variants measured (other corrections, R_train of every chunk...): (mean, low, high) of variant − default
        "variants_minus_default": {
            m: [-versus[m]["tail_patch"][0], -versus[m]["tail_patch"][2], -versus[m]["tail_patch"][1]]
            for m in VARIANTS
            if m in versus
        },
        # each correction variant's own effect: it minus TrackStar without any correction
        "correction_effects": {m: e for m, e in report.get("correction_effects", {}).items() if m != "trackstar"},
        "optimizer_correction": report.get("optimizer_correction", ""),
        "trackstar_below": [m for m in rivals if methods[m]["tail_patch"] > full],
        "trackstar_at_least_ablations_and_trak": all(methods[m]["tail_patch"] <= full for m in rivals),
        # above by more than the paired 95% interval allows (TrackStar − rival's interval below 0)
        "significantly_above_trackstar": [m for m in rivals if m in versus and versus[m]["tail_patch"][2] < 0],
    }


def aims(rows: list[dict]) -> list[str]:
    """The family's aims, each over every world: the worst world's value against the aim."""

    def line(what: str, aim: str, measured: float, met: bool) -> str:
        return f"aim: {what} {aim}: measured {measured:+.4f} ({'met' if met else 'not met'})"

    correction = min(r["correction_tail_patch"][1] for r in rows)
    lines = [
        line(
            "optimizer correction's tail-patch Δlog p effect, 95% lower bound, every world",
            f"≥ {CORRECTION_AIM}",
            correction,
            correction >= CORRECTION_AIM,
        )
    ]
    for metric, name in (("delta_log_prob", "Δlog p"), ("delta_prob", "Δp")):
        worst = min(r[f"trackstar_over_bm25_{metric}"][0] for r in rows)
        lines.append(
            line(f"TrackStar / BM25 tail-patch {name}, every world", f"≥ {RATIO_AIM}", worst, worst >= RATIO_AIM)
        )
    above = sum(bool(r["significantly_above_trackstar"]) for r in rows)
    by_point = sum(not r["trackstar_at_least_ablations_and_trak"] for r in rows)
    lines.append(
        f"aim: worlds where an ablation or TRAK is above full TrackStar's tail-patch beyond the paired 95% "
        f"interval = 0: measured {above} of {len(rows)} (by point estimate: {by_point}) "
        f"({'met' if above == 0 else 'not met'})"
    )
    for variant in sorted({v for r in rows for v in r.get("correction_effects", {})}):
        measured = [r["correction_effects"][variant][1] for r in rows if variant in r.get("correction_effects", {})]
        lines.append(
            line(
                f"{variant}'s own correction effect, 95% lower bound, the {len(measured)} world(s) measuring it",
                f"≥ {CORRECTION_AIM}",
                min(measured),
                min(measured) >= CORRECTION_AIM,
            )
        )
    margin = min(r["mrr_bm25"] - r["mrr_trackstar"] for r in rows)
    lines.append(line("BM25 MRR − TrackStar MRR, every world", "> 0", margin, margin > 0))
    return lines


def table(rows: list[dict]) -> str:
    header = (
        f"{'preset':<24} {'seed':>4} {'optimizer':<9} {'correction Δlog p [95%]':>30} "
        f"{'TS/BM25 Δlog p':>15} {'TS/BM25 Δp':>11} {'MRR TS':>7} {'MRR BM25':>8}  TrackStar below"
    )
    lines = [header]
    for r in rows:
        mean, low, high = r["correction_tail_patch"]
        lines.append(
            f"{r['preset']:<24} {r['seed']:>4} {r['optimizer']:<9} {f'{mean:+.4f} [{low:+.4f}, {high:+.4f}]':>30} "
            f"{r['trackstar_over_bm25_delta_log_prob'][0]:>15.2f} {r['trackstar_over_bm25_delta_prob'][0]:>11.2f} "
            f"{r['mrr_trackstar']:>7.3f} {r['mrr_bm25']:>8.3f}  {', '.join(r['trackstar_below']) or 'none'}"
        )
        for variant, (v_mean, v_low, v_high) in r.get("variants_minus_default", {}).items():
            line = f"{'':<24} {variant} − default: {v_mean:+.4f} [{v_low:+.4f}, {v_high:+.4f}]"
            if variant in r.get("correction_effects", {}):
                e_mean, e_low, e_high = r["correction_effects"][variant]
                line += f"; its own correction effect {e_mean:+.4f} [{e_low:+.4f}, {e_high:+.4f}]"
            lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Three panels, one point per world: the correction's effect, the TrackStar / BM25 ratios, MRR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['preset']}\ns{r['seed']} {r['optimizer']}" for r in rows]
    x = range(len(rows))
    figure, (effect, ratio, mrr) = plt.subplots(3, 1, figsize=(max(6, 1.2 * len(rows)), 10), sharex=True)

    def with_interval(axis, triples, offset, label):
        means = [t[0] for t in triples]
        errors = [[t[0] - t[1] for t in triples], [t[2] - t[0] for t in triples]]
        axis.errorbar([i + offset for i in x], means, yerr=errors, fmt="o", capsize=3, label=label)

    with_interval(effect, [r["correction_tail_patch"] for r in rows], 0, "TrackStar − no optimizer correction")
    effect.axhline(CORRECTION_AIM, color="grey", linestyle="--", label=f"aim: lower bound ≥ {CORRECTION_AIM}")
    effect.set_ylabel("tail-patch Δlog p")
    for offset, metric, name in ((-0.1, "delta_log_prob", "Δlog p"), (0.1, "delta_prob", "Δp")):
        with_interval(ratio, [r[f"trackstar_over_bm25_{metric}"] for r in rows], offset, name)
    ratio.axhline(RATIO_AIM, color="grey", linestyle="--", label=f"aim ≥ {RATIO_AIM}")
    ratio.set_ylabel("TrackStar / BM25 tail-patch")
    mrr.plot(x, [r["mrr_trackstar"] for r in rows], "o", label="TrackStar")
    mrr.plot(x, [r["mrr_bm25"] for r in rows], "s", label="BM25")
    mrr.set_ylabel("MRR")
    mrr.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    for axis in (effect, ratio, mrr):
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def render(rows: list[dict], out: Path) -> None:
    """The table, the aims and the picture (under `out`)."""
    print(table(rows))
    for line in aims(rows):
        print(line)
    plot(rows, out / "world_family.png")
    print(f"picture: {out / 'world_family.png'}")


def family(args) -> list[tuple[str, int, str]]:
    """(preset, seed, optimizer) of every run: world i is preset i (cycling) with seed i, each
    (preset, seed) once (one preset and one seed given: one world, not --worlds copies of it)."""
    seeds = args.seeds or [FIRST_SEED + i for i in range(args.worlds)]
    worlds = dict.fromkeys((args.presets[i % len(args.presets)], seeds[i % len(seeds)]) for i in range(args.worlds))
    return [(preset, seed, optimizer) for preset, seed in worlds for optimizer in args.optimizers]


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The bench's own arguments, and evaluate's (those after `--`)."""
    own, evaluate_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=len(PRESETS), help="worlds (each with both optimizers)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(world.PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", help=f"world seeds (default {FIRST_SEED}, {FIRST_SEED + 1}…)")
    parser.add_argument("--optimizers", nargs="+", default=["adam", "adafactor"], choices=["adam", "adafactor"])
    parser.add_argument("--facts-per-bucket", type=int, default=16)
    parser.add_argument("--out", default="reports/world-family")
    parser.add_argument("--from-json", help="re-render this world_family.json without computing anything")
    return parser.parse_args(own), evaluate_args


def previous_seconds(path: Path) -> dict:
    """(preset, seed, optimizer) -> the seconds a world, its model and evaluation took when it was made
    (a resumed run keeps them)."""
    if not path.exists():
        return {}
    return {(r["preset"], r["seed"], r["optimizer"]): r.get("seconds") for r in json.loads(path.read_text())["worlds"]}


def main(argv: list[str] | None = None) -> None:
    args, evaluate_args = parse(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["worlds"]
        render(rows, Path(args.from_json).parent)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, earlier = [], previous_seconds(out / "world_family.json")
    for preset, seed, optimizer in family(args):
        resumed = (world_lake(out, preset, seed, optimizer) / "reports" / "eval.json").exists()
        started = time.time()
        report = evaluate_world(out, preset, seed, optimizer, args.facts_per_bucket, evaluate_args)
        seconds = earlier.get((preset, seed, optimizer)) if resumed else round(time.time() - started, 1)
        rows.append(world_row(preset, seed, optimizer, report) | {"seconds": seconds})
        # written after every world: an interrupted family still has what it measured
        (out / "world_family.json").write_text(json.dumps({"worlds": rows}, indent=2))
    render(rows, out)


if __name__ == "__main__":
    main()
