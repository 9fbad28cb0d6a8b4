"""LoRA training: the trainer, the resumable job, the kohya sd-scripts delegate, kohya-format export."""
