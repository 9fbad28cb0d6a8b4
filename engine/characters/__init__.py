"""Characters and their datasets: characters, projects, ingest, review, captions, reference sheets."""

from engine.jobs.kinds import JobKind

JOB_KINDS = {
    "ingest": JobKind(
        "engine.characters.datasets:run_ingest_job",
        "engine.characters.datasets:IngestRequest",
        uses_gpu=False,
    ),
    "caption": JobKind(
        "engine.characters.datasets:run_caption_job",
        "engine.characters.datasets:CaptionRequest",
        uses_gpu=False,
    ),
}
