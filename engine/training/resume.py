"""Training runs a crash or restart interrupted, and the checkpoint step a resume continues from."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import col, select

from engine.store.database import Character, Database, Job
from engine.training.kohya import KohyaLayout, latest_state
from engine.training.trainer import CHECKPOINT_NAME, COMPLETE_MARKER

TRAINING_KINDS = ("train_lora", "train_lora_kohya")


def interrupted_trainings(db: Database, data_dir: Path) -> list[dict]:
    """Training jobs a crash or restart interrupted, newest first, with the step the last complete
    checkpoint holds (what a resume continues from): what the Train tab offers to resume."""

    with db.session() as s:
        jobs = list(
            s.exec(
                select(Job)
                .where(Job.status == "interrupted", col(Job.kind).in_(TRAINING_KINDS))
                .order_by(col(Job.created_at).desc())
            )
        )
        names = {c.id: c.slug for c in s.exec(select(Character))}
    out = []
    for job in jobs:
        train = (job.request or {}).get("train") or {}
        work = data_dir / "training" / job.id
        if job.kind == "train_lora_kohya":  # sd-scripts' --save_state folders
            state = latest_state(
                KohyaLayout(work / "kohya").output_dir,
                train.get("output_name", ""),
                int(train.get("max_train_steps") or 0),
            )
            steps = [state[1]] if state else []
        else:
            root = work / "checkpoints"
            steps = [
                int(m.group(1))
                for p in (root.iterdir() if root.is_dir() else [])
                if (m := CHECKPOINT_NAME.match(p.name)) and (p / COMPLETE_MARKER).is_file()
            ]
        out.append(
            {
                "job_id": job.id,
                "kind": job.kind,
                "owner": job.owner,
                "character": names.get((job.request or {}).get("character_id"), "?"),
                "checkpoint_step": max(steps, default=0),
                "total": train.get("max_train_steps"),
                "progress_step": (job.progress or {}).get("step"),
                "interrupted_at": job.finished_at,
            }
        )
    return out
