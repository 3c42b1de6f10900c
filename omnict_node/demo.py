"""``omnict-node demo``: the main job end to end on the embedded defaults.

Generates a synthetic CT study (phantom with findings), starts the node (SCP, completeness, a Celery worker
process), sends the study with dcmtk ``storescu`` as a PACS would, waits until the pipeline has finished and prints
the study's state, stage timings and the result objects the node produced.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import click

from omnict_node.cli import NodeContext, pass_node
from omnict_node.logs import configure_logging


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline_finished(run) -> bool:
    from db.models import RunState
    from workers.stages import STAGES

    if run.state in (RunState.DELIVERED, RunState.FAILED, RunState.DELIVERY_FAILED):
        return True
    return bool(run.result and STAGES[-1].name in run.result)


@click.command()
@click.option("--slices", default=96, show_default=True)
@click.option("--size", default=256, show_default=True)
@click.option("--finding", "findings", multiple=True, default=("lung_nodule:size_mm=14", "pleural_effusion:side=right"),
              show_default=True, help="Phantom findings (see `omnict-node phantom --help`).")
@click.option("--seed", default=7, show_default=True)
@click.option("--timeout", "timeout_s", default=900.0, show_default=True)
@pass_node
def demo(node: NodeContext, slices: int, size: int, findings: tuple[str, ...], seed: int, timeout_s: float) -> None:
    """Generate a CT study, send it to a freshly started node with storescu, wait for the results, print them."""
    from omnict_core.phantom import PhantomSpec, generate_study, write_dicom_study
    from omnict_node.config import load_settings
    from omnict_node.serve import Node
    from omnict_node.status import _print_detail, study_detail

    if shutil.which("storescu") is None:
        raise click.ClickException("dcmtk's storescu is missing: run scripts/setup (apt-get install dcmtk)")
    base = node.settings
    settings = load_settings(
        node.config_file,
        data_dir=str(base.data_dir / "demo"),
        dicom={"port": _free_port()},
        api={"port": _free_port()},
        completeness={"series_quiet_s": 2.0, "study_quiet_s": 3.0, "sweep_interval_s": 0.2},
        log_level="WARNING",
    )
    configure_logging(settings.log_level)

    click.echo(f"1/4 generating a {slices}-slice {size}x{size} phantom CT study with {', '.join(findings) or 'no findings'}")
    study = generate_study(PhantomSpec(seed=seed, slices=slices, size=size, findings=list(findings)))
    paths = write_dicom_study(study, settings.data_dir / "incoming-phantom" / str(seed))
    study_uid = study.uids["study"]

    click.echo(f"2/4 starting the node: AE {settings.dicom.ae_title} on 127.0.0.1:{settings.dicom.port}, "
               f"data in {settings.data_dir}")
    running = Node(settings, node.config_file)
    running.start()
    try:
        click.echo(f"3/4 sending the study with storescu ({len(paths.ct_files)} CT slices + localizer)")
        sent = subprocess.run(
            ["storescu", "-aet", "DEMO_PACS", "-aec", settings.dicom.ae_title, "+sd", "+r", "127.0.0.1",
             str(settings.dicom.port), *{str(p.parent) for p in [*paths.ct_files, *paths.localizer_files]}],
            capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"),
        )
        if sent.returncode != 0:
            raise click.ClickException(f"storescu failed: {sent.stderr.strip()[-500:]}")
        click.echo("4/4 waiting for completeness and the pipeline")
        run = _wait_for_results(running, study_uid, timeout_s)
        with running.session_factory() as session:
            _print_detail(study_detail(session, study_uid))
        _print_results(settings, running.session_factory, run)
        if run.error:
            raise click.ClickException(f"the run failed: {run.error}")
    finally:
        running.stop()


def _wait_for_results(running, study_uid: str, timeout_s: float):
    from sqlalchemy import select

    from db.models import PipelineRun, Study

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with running.session_factory() as session:
            run = session.scalars(select(PipelineRun).join(Study).where(Study.study_instance_uid == study_uid)
                                  .order_by(PipelineRun.run_number.desc())).first()
        if run is not None and _pipeline_finished(run):
            return run
        time.sleep(0.5)
    raise click.ClickException(f"no result within {timeout_s:.0f} s; see `omnict-node status {study_uid}`")


def _print_results(settings, session_factory, run) -> None:
    from sqlalchemy import select

    from db.models import Finding, ResultObject

    with session_factory() as session:
        objects = session.scalars(select(ResultObject).where(ResultObject.run_id == run.id)).all()
        findings = session.scalars(select(Finding).where(Finding.run_id == run.id).order_by(Finding.id)).all()
    if findings:
        click.echo("model answers (demo model trained on synthetic phantoms; not for clinical use):")
        for finding in findings:
            click.echo(f"  {finding.question}  ->  {finding.answer[:120]}")
    if not objects:
        click.echo("no result objects for this run")
        return
    click.echo("result objects:")
    for obj in objects:
        click.echo(f"  {obj.kind:<15} {Path(settings.data_dir) / obj.path}")
