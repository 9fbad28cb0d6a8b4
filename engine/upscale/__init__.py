"""Upscaling: Real-ESRGAN family via spandrel, the SD x4 upscaler, video frame by frame; the upscale job."""
