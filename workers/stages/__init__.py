"""The pipeline's stages, in order. Each module holds one stage function ``(StageContext) -> dict``."""

from db.models import RunState
from workers.celery_app import CPU_QUEUE, GPU_QUEUE  # noqa: F401  (GPU_QUEUE used as stages land)
from workers.pipeline import Stage
from workers.stages.assemble import assemble

STAGES: list[Stage] = [
    Stage("assemble", RunState.ASSEMBLING, CPU_QUEUE, assemble),
]
