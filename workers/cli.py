"""``omnict-node worker`` (a Celery worker process) and ``omnict-node study`` (operator actions on studies)."""

from __future__ import annotations

import click

from omnict_node.cli import NodeContext, pass_node


@click.command()
@click.option("--queues", "-Q", default="cpu,gpu", show_default=True, help="Queues to consume (gpu workers: 'gpu').")
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes (default from config).")
@click.option("--pool", default="solo", show_default=True,
              help="'solo' keeps one process whose loaded model stays warm; 'prefork' for several CPU workers.")
@pass_node
def worker(node: NodeContext, queues: str, concurrency: int | None, pool: str) -> None:
    """Run a Celery worker for the pipeline."""
    from omnict_node.logs import configure_logging
    from workers.celery_app import make_celery

    configure_logging(node.settings.log_level)
    app = make_celery(node.settings)
    app.omnict_queues = tuple(q.strip() for q in queues.split(","))  # a gpu-queue worker loads its models at start
    quiet = ["--quiet"] if node.settings.log_level.upper() in ("WARNING", "ERROR", "CRITICAL") else []
    argv = [*quiet, "worker", "-Q", queues, "--pool", pool, "--loglevel", node.settings.log_level,
            "-c", str(concurrency or node.settings.workers.concurrency), "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-n", f"omnict-{queues.replace(',', '-')}@%h"]
    app.worker_main(argv)


@click.group()
def study() -> None:
    """Operator actions on one study."""


@study.command("complete")
@click.argument("study_instance_uid")
@pass_node
def complete(node: NodeContext, study_instance_uid: str) -> None:
    """Declare a study complete now (its timers are skipped). The running node dispatches it within a second."""
    from db.session import session_factory_for, session_scope
    from dicom_node.completeness import force_complete

    factory = session_factory_for(node.settings.database.url)
    with session_scope(factory) as session:
        run_id = force_complete(session, study_instance_uid)
    if run_id is None:
        raise click.ClickException(f"study {study_instance_uid} has no run that is still receiving")
    click.echo(f"study {study_instance_uid}: run {run_id} complete (forced)")


@study.command("rerun")
@click.argument("study_instance_uid")
@pass_node
def rerun(node: NodeContext, study_instance_uid: str) -> None:
    """Run the whole pipeline again on the stored study (a new run; the running node dispatches it)."""
    from workers.operations import open_rerun

    number = _operate(node, open_rerun, study_instance_uid)
    click.echo(f"study {study_instance_uid}: run {number} opened (rerun)")


@study.command("redeliver")
@click.argument("study_instance_uid")
@pass_node
def redeliver(node: NodeContext, study_instance_uid: str) -> None:
    """Send the latest run's results again (after delivery_failed, or to resend)."""
    from workers.celery_app import make_celery
    from workers.operations import prepare_redelivery
    from workers.tasks import dispatch_stage

    run_id = _operate(node, prepare_redelivery, study_instance_uid)
    dispatch_stage(make_celery(node.settings), run_id, "deliver", "cpu")
    click.echo(f"study {study_instance_uid}: redelivery of run {run_id} queued")


def _operate(node: NodeContext, operation, study_instance_uid: str):
    """``operation(session, study_instance_uid)`` in one transaction; its OperationError is the command's error."""
    from db.session import session_factory_for, session_scope
    from workers.operations import OperationError

    try:
        with session_scope(session_factory_for(node.settings.database.url)) as session:
            return operation(session, study_instance_uid)
    except OperationError as exc:
        raise click.ClickException(str(exc)) from exc
