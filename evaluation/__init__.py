"""The evaluation's pure parts: per-query metrics with bootstrap intervals, and the HTML report."""
