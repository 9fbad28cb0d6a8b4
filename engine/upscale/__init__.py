"""Upscaling: Real-ESRGAN family via spandrel, the SD x4 upscaler, video frame by frame; the upscale job."""

from engine.jobs.kinds import JobKind

JOB_KINDS = {
    "upscale": JobKind("engine.upscale.job:run_upscale_job", "engine.upscale.job:UpscaleRequest"),
}
