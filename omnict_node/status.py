"""``omnict-node status [UID]``: where every study is, or one study's runs and stage timings."""

from __future__ import annotations

import json

import click
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.models import PipelineRun, Study
from omnict_node.cli import NodeContext, pass_node


def study_overview(session: Session, limit: int = 50) -> list[dict]:
    """One row per study, newest first: instances, series, latest run and its state."""
    studies = session.scalars(
        select(Study).options(selectinload(Study.runs), selectinload(Study.series))
        .order_by(Study.last_received_at.desc()).limit(limit)
    ).all()
    rows = []
    for study in studies:
        latest = study.runs[-1] if study.runs else None
        rows.append({
            "study_instance_uid": study.study_instance_uid,
            "instances": study.instance_count,
            "series": len(study.series),
            "run": latest.run_number if latest else None,
            "state": latest.state.value if latest else None,
            "last_received_at": study.last_received_at.isoformat(),
            "error": latest.error if latest else None,
        })
    return rows


def study_detail(session: Session, study_instance_uid: str) -> dict | None:
    """Everything an operator needs about one study: series, runs, stage attempts with timings, errors."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
        .options(selectinload(Study.series), selectinload(Study.runs).selectinload(PipelineRun.stages))
    ).first()
    if study is None:
        return None
    return {
        "study_instance_uid": study.study_instance_uid,
        "modalities": study.modalities,
        "instances": study.instance_count,
        "first_received_at": study.first_received_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
        "series": [{"series_instance_uid": s.series_instance_uid, "modality": s.modality,
                    "instances": s.instance_count} for s in study.series],
        "runs": [{
            "run": run.run_number,
            "state": run.state.value,
            "trigger": run.trigger,
            "opened_at": run.opened_at.isoformat(),
            "completed_at": run.completed_at.isoformat() if run.completed_at else None,
            "completion_reason": run.completion_reason,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "error": run.error,
            "stages": [{"stage": st.stage, "attempt": st.attempt, "outcome": st.outcome,
                        "duration_s": st.duration_s, "error": st.error} for st in run.stages],
        } for run in study.runs],
    }


@click.command()
@click.argument("study_instance_uid", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_node
def status(node: NodeContext, study_instance_uid: str | None, as_json: bool) -> None:
    """Show studies and their state, or one study's runs and stage timings."""
    from db.migrate import schema_problem
    from db.session import session_factory_for, session_scope

    problem = schema_problem(node.settings.database.url)
    if problem:
        raise click.ClickException(problem)
    factory = session_factory_for(node.settings.database.url)
    with session_scope(factory) as session:
        data = study_detail(session, study_instance_uid) if study_instance_uid else study_overview(session)
    if data is None:
        raise click.ClickException(f"unknown study {study_instance_uid}")
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif study_instance_uid:
        _print_detail(data)
    else:
        _print_overview(data)


def _print_overview(rows: list[dict]) -> None:
    if not rows:
        click.echo("no studies yet")
        return
    click.echo(f"{'STUDY INSTANCE UID':64}  {'INST':>5} {'SER':>3} {'RUN':>3}  STATE")
    for row in rows:
        state = row["state"] or "-"
        if row["error"]:
            state += f"  ({row['error'][:60]})"
        click.echo(f"{row['study_instance_uid']:64}  {row['instances']:>5} {row['series']:>3} {row['run'] or '-':>3}  {state}")


def _print_detail(data: dict) -> None:
    click.echo(f"study {data['study_instance_uid']}  modalities={data['modalities']}  instances={data['instances']}")
    for series in data["series"]:
        click.echo(f"  series {series['series_instance_uid']}  {series['modality']}  {series['instances']} instances")
    for run in data["runs"]:
        click.echo(f"  run {run['run']}: {run['state']}  trigger={run['trigger']}  "
                   f"completed={run['completed_at']} ({run['completion_reason']})")
        if run["error"]:
            click.echo(f"    error: {run['error']}")
        for stage in run["stages"]:
            duration = f"{stage['duration_s']:.2f} s" if stage["duration_s"] is not None else "running"
            click.echo(f"    {stage['stage']:<10} attempt {stage['attempt']}  {stage['outcome']:<7} {duration}"
                       + (f"  {stage['error']}" if stage["error"] else ""))
