"""Video generation: SVD, LTX-Video, AnimateDiff, camera motion; the generate_video job."""

from engine.jobs.kinds import JobKind

JOB_KINDS = {
    "generate_video": JobKind("engine.video.job:run_video_job", "engine.video.job:VideoRequest"),
}
