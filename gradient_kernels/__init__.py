"""The TrackStar math in pure PyTorch: no files, tables, Spark or Airflow.

projection   deterministic Gaussian projections and their fingerprint
modules      which weight matrices get a block, and their layout (Linear, Conv1D, tied head)
losses       per-example losses: documents (all next tokens) and queries (target tokens only)
normalizers  optimizer corrections g / sqrt(V): Adafactor factored, Adam exact or rank-1 fit
hooks        per-example projected gradients by forward/backward hooks (the fast path)
hessian      autocorrelation, task mixing, λ by spectra crossing, damped inverse roots
scoring      preconditioning, unit norm, exact top-k and its merge
attribution  per-token contributions to a score
reference    the exact path: full per-example gradients, for tests and benchmarks
"""
