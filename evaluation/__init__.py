"""The research evaluation: baselines, TrackStar and its ablations (`evaluate`), per-query metrics with bootstrap intervals, and the HTML report."""
