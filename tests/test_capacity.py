"""docs/capacity.md is what bench/capacity.py makes of the measured runs in docs/results/, and its
arithmetic holds: GPU-hours are tokens ÷ the measured rate, storage is vectors × bytes per vector."""

import re
from pathlib import Path

from bench import capacity

REPO = Path(__file__).resolve().parent.parent


def test_the_capacity_page_is_generated_from_the_measured_runs():
    measured = capacity.load(REPO / "docs" / "results")
    assert (REPO / "docs" / "capacity.md").read_text() == capacity.render(measured)


def test_gpu_hours_and_storage_follow_from_the_rates():
    measured = capacity.load(REPO / "docs" / "results")
    rates = capacity.rates(measured)
    page = capacity.render(measured)
    rate_160m = measured["160m"]["extraction"]["adam-factored bfloat16"]["tokens_per_s"]
    assert rates["160M"][0] == rate_160m
    days = capacity.C4_TOKENS / rate_160m / 86400
    assert f"| 160M | {rate_160m:,.0f} | measured | {days * 24 / capacity.C4_PARTITIONS:,.2f} | {days:,.1f} |" in page
    # 8B at the 1B model's share of the 4N-FLOP limit: 8x the parameters, 1/8 of the rate
    assert abs(rates["8B"][0] * 8e9 - rates["1B"][0] * measured["1b"]["parameters"]) / (rates["1B"][0] * 1e9) < 0.05
    gpt2 = measured["cpu"]["gpt2"][max(measured["cpu"]["gpt2"], key=int)]
    vectors = capacity.C4_DOCUMENTS * gpt2["chunks"] / gpt2["documents"]
    float32_all = re.search(r"\| 2\^16 = 65,536 \| [^|]+ \| ([^|]+) \|", page).group(1).strip()
    assert float32_all == capacity.human_bytes(4 * 65536 * vectors)
