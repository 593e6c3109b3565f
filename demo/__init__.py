"""The demo harness: the embedded fact world (or your imported data), the small model trained on it, and the end-to-end pipeline."""
