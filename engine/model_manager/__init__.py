"""Models: loading and caching pipelines, single-file checkpoints, downloads, the demo model."""

from engine.jobs.kinds import JobKind

JOB_KINDS = {
    "download": JobKind(
        "engine.model_manager.downloads:run_download_job",
        "engine.model_manager.downloads:DownloadRequest",
        uses_gpu=False,
        resumable=True,
    ),
}
