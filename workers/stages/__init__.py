"""The pipeline's stages, in order. Each module holds one stage function ``(StageContext) -> dict``; the segment stage
also starts two side tasks (workers/stages/measurements.py): ``seg_object`` (the SEG, encoded as soon as the label
map is written) and ``measurements`` (the measurement SR, and both sent while inference runs)."""

from db.models import RunState
from workers.celery_app import CPU_QUEUE, GPU_QUEUE
from workers.pipeline import Stage
from workers.stages.assemble import assemble
from workers.stages.deliver import deliver
from workers.stages.infer import infer
from workers.stages.measurements import MEASUREMENTS, SEGMENTATION_OBJECT
from workers.stages.report import report
from workers.stages.segment import segment

STAGES: list[Stage] = [
    Stage("assemble", RunState.ASSEMBLING, CPU_QUEUE, assemble),
    Stage("segment", RunState.SEGMENTING, GPU_QUEUE, segment, side_tasks=(MEASUREMENTS,),
          early_side_tasks=(SEGMENTATION_OBJECT,)),
    Stage("infer", RunState.INFERRING, GPU_QUEUE, infer),
    Stage("report", RunState.REPORTING, CPU_QUEUE, report),
    Stage("deliver", RunState.DELIVERING, CPU_QUEUE, deliver),
]
