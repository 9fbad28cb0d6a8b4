"""Models: loading and caching pipelines, single-file checkpoints, downloads, the demo model."""
