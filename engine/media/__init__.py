"""The media factory: probing, rendering video variants with FFmpeg, and drawing text overlays.

Nothing here imports gradio; heavy modules (av, PIL, ffmpeg-python) are imported inside functions.
"""
