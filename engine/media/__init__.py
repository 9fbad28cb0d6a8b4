"""The media factory: probing, rendering video variants with FFmpeg, and drawing text overlays.

Nothing here imports gradio; heavy modules (av, PIL, ffmpeg-python) are imported inside functions.
"""

from engine.jobs.kinds import JobKind

JOB_KINDS = {
    "variants": JobKind(
        "engine.media.variants:run_variants_job", "engine.media.variants:VariantsRequest", uses_gpu=False
    ),
    "cleanup": JobKind(
        "engine.media.variants:run_cleanup_job", "engine.media.variants:CleanupRequest", uses_gpu=False
    ),
    "motion_clip": JobKind(
        "engine.media.variants:run_motion_job", "engine.media.variants:MotionClipRequest", uses_gpu=False
    ),
    "join_clips": JobKind(
        "engine.media.variants:run_join_job", "engine.media.variants:JoinClipsRequest", uses_gpu=False
    ),
}
