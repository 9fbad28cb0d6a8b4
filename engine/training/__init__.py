"""LoRA training: the trainer, the resumable job, the kohya sd-scripts delegate, kohya-format export."""

from engine.jobs.kinds import JobKind

JOB_KINDS = {
    "train_lora": JobKind(
        "engine.training.job:run_train_job", "engine.training.job:TrainJobRequest", resumable=True
    ),
    "train_lora_kohya": JobKind(
        "engine.training.kohya:run_kohya_job", "engine.training.job:TrainJobRequest", resumable=True
    ),
}
