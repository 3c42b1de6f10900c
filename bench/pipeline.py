"""Pipeline benchmark: from the last C-STORE response to the results stored in the PACS, split by stage.

    python bench/pipeline.py [--slices 300] [--size 512] [--runs 1] [--warm]

* A real Orthanc (the PACS, on loopback) and the node as a real process on the embedded defaults (SQLite, filesystem
  Celery transport, the two embedded worker processes (gpu queue: segment, infer; cpu queue: the rest), classical
  segmentation, the shipped OmniCT checkpoint), delivering to Orthanc.
* A phantom CT study (300 slices of 512x512 by default, with findings) is sent to the node with dcmtk ``storescu``;
  the clock starts when storescu exits (the last C-STORE response) and stops when Orthanc holds all result objects
  (SEG, 3 SRs, KOS) of the study.
* The study is sent as soon as the node's DICOM port opens, as to a node that has just been (re)started: the worker
  processes' own start-up (Python, Celery, imports) overlaps the transfer and, when it takes longer, adds to the
  measured time (on a loaded 2-core machine up to 1-2 s, seen as a late start of the assemble stage). ``--warm``
  sends it once every worker is up and warm (its ``<data_dir>/workers/<pid>.warm`` marker, written when its stage
  dependencies are imported and, for the gpu-queue worker, its models are loaded): the steady state of a node that
  is already running.
* The quiet periods are set to their minimum (series 0.2 s, study 0.3 s, sweep 0.1 s) and EXCLUDED: the time from the
  last C-STORE response to the completion decision is printed and subtracted.
* Stage times come from the node's own records (``run_stages``). Segmentation = the segment stage (the segmenter
  and the organ measurements it records), inference = the infer stage (resampling to the model's grid and the
  question battery with the report). Overhead = everything else: completion hand-off, queueing, assembling,
  reporting, delivery. The side tasks on the cpu worker — ``seg_object`` (the SEG, from the moment the label map is
  written) and ``measurements`` (the measurement SR, and both sent while the gpu worker runs inference) — are
  printed with the stages; they overlap them, so only the wall clock counts. The timeline line shows when each ran.
  Last line:
  ``overhead_ratio=<(total - segmentation - inference) / total>`` (goal <= 0.20), with ``--runs N`` the median of
  the runs' own ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from db.models import PipelineRun, RunState, StageRecord, Study  # noqa: E402
from db.session import session_scope  # noqa: E402
from omnict_core.phantom import PhantomSpec, generate_study, write_dicom_study  # noqa: E402
from omnict_node.config import load_settings  # noqa: E402
from tests import services  # noqa: E402  (the same real peers the tests start)
from tests.node_process import NodeProcess  # noqa: E402

RESULT_COUNT = 5  # SEG + measurement SR + findings SR + narrative SR + KOS


def orthanc_result_count(orthanc, study_uid: str) -> int:
    """Instances Orthanc holds for the study (the CT went to the node only: all of them are results)."""
    studies = orthanc.post_json("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    return len(orthanc.get_json(f"/studies/{studies[0]}/instances")) if studies else 0


def wait_for_warm_workers(node_dir: Path, node: NodeProcess, count: int, timeout_s: float = 300.0) -> float:
    """Seconds waited until the node's ``count`` worker processes marked themselves warm (workers.tasks.warm_marker)."""
    started = time.monotonic()
    while len(list((node_dir / "workers").glob("*.warm"))) < count:
        if time.monotonic() - started > timeout_s:
            raise SystemExit("the node's worker did not become ready:\n" + node.log_text()[-3000:])
        time.sleep(0.1)
    return time.monotonic() - started


def one_run(work: Path, slices: int, size: int, seed: int, checkpoint: str | None, warm: bool = False) -> dict:
    orthanc = services.start_orthanc(work / "orthanc")
    settings = load_settings(
        data_dir=str(work / "node"),
        dicom={"port": services.free_port(),
               "destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]},
        completeness={"series_quiet_s": 0.2, "study_quiet_s": 0.3, "sweep_interval_s": 0.1},
        log_level="WARNING",
        model={"checkpoint": checkpoint} if checkpoint else {},
    )
    study = generate_study(PhantomSpec(seed=seed, slices=slices, size=size,
                                       findings=["lung_nodule:size_mm=12", "pleural_effusion:side=left"]))
    paths = write_dicom_study(study, work / "study", localizer=False, ground_truth=False)
    node = NodeProcess(settings, work / "node.log").start()
    try:
        if warm:
            wait_for_warm_workers(settings.data_dir, node, len(settings.workers.embedded_queues))
        sent = subprocess.run(["storescu", "-aec", settings.dicom.ae_title, "+sd", "127.0.0.1",
                               str(settings.dicom.port), str(paths.ct_files[0].parent)],
                              capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"))
        last_response = dt.datetime.now(dt.timezone.utc)
        clock = time.monotonic()
        if sent.returncode != 0:
            raise SystemExit(f"storescu failed: {sent.stderr[-500:]}")
        deadline = clock + 1800
        while orthanc_result_count(orthanc, study.uids["study"]) < RESULT_COUNT:
            if time.monotonic() > deadline:
                raise SystemExit("results did not reach Orthanc in 30 min:\n" + node.log_text()[-3000:])
            runs = node.runs(study.uids["study"])
            if runs and runs[-1].state in (RunState.FAILED, RunState.DELIVERY_FAILED):
                raise SystemExit(f"run failed: {runs[-1].error}")
            time.sleep(0.05)
        wall = time.monotonic() - clock
        with session_scope(node.session_factory) as session:
            run = session.scalars(select(PipelineRun).join(Study)
                                  .where(Study.study_instance_uid == study.uids["study"])).one()
            records = session.scalars(select(StageRecord).where(StageRecord.run_id == run.id,
                                                                StageRecord.outcome == "ok")).all()
            stages = {s.stage: s.duration_s for s in records}
            completed_at = run.completed_at
            # When each stage ran, in seconds after the completion decision: shows the critical path and the gaps
            # between stages (queue hand-offs).
            timeline = {s.stage: ((s.started_at - completed_at).total_seconds(),
                                  (s.finished_at - completed_at).total_seconds()) for s in records}
        quiet = max(0.0, (completed_at - last_response).total_seconds())
        return {"wall": wall, "quiet": quiet, "total": wall - quiet, "stages": stages, "timeline": timeline}
    finally:
        node.stop()
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--checkpoint", default=None, help="OmniCT checkpoint (default: the shipped one)")
    parser.add_argument("--warm", action="store_true",
                        help="send the study once the node's worker is up and warm, not as soon as its port opens")
    args = parser.parse_args()
    results = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="omnict-bench-pipeline-") as tmp:
            result = one_run(Path(tmp), args.slices, args.size, seed=100 + index, checkpoint=args.checkpoint,
                             warm=args.warm)
        results.append(result)
        stages = "  ".join(f"{name} {seconds:.2f} s" for name, seconds in result["stages"].items())
        print(f"run {index + 1}: last C-STORE response -> results in Orthanc {result['wall']:.2f} s; quiet period "
              f"(excluded) {result['quiet']:.2f} s; measured {result['total']:.2f} s | {stages}", flush=True)
        timeline = "  ".join(f"{name} {start:.2f}-{end:.2f}" for name, (start, end) in
                             sorted(result["timeline"].items(), key=lambda item: item[1]))
        print(f"  timeline (s after the completion decision; results in Orthanc at "
              f"{result['total']:.2f}): {timeline}", flush=True)
    # Each run's ratio from its own numbers (the median total minus medians of segmentation and inference would mix
    # runs: on a shared machine the model stages vary by seconds from run to run).
    for r in results:
        r["overhead"] = r["total"] - r["stages"].get("segment", 0.0) - r["stages"].get("infer", 0.0)
    total = statistics.median(r["total"] for r in results)
    segmentation = statistics.median(r["stages"].get("segment", 0.0) for r in results)
    inference = statistics.median(r["stages"].get("infer", 0.0) for r in results)
    overhead = statistics.median(r["overhead"] for r in results)
    ratio = statistics.median(r["overhead"] / r["total"] for r in results)
    print(f"study: {args.slices} slices {args.size}x{args.size}; quiet periods set to their minimum "
          f"(series 0.2 s, study 0.3 s) and excluded; sent "
          + ("once the node's worker was up and warm, its models loaded (--warm)"
             if args.warm else "as soon as the node's port opened (the worker's start-up may overlap)"))
    print(f"medians: total {total:.2f} s, segmentation {segmentation:.2f} s, inference {inference:.2f} s, "
          f"everything else {overhead:.2f} s")
    print("per-run overhead ratios: " + ", ".join(f"{r['overhead'] / r['total']:.3f}" for r in results)
          + " (the median below)")
    print(f"overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
