"""Video generation: SVD, LTX-Video, AnimateDiff, camera motion; the generate_video job."""
