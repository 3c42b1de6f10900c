"""``omnict-node api`` (serve the HTTP API), ``omnict-node findings UID`` and ``omnict-node worklist``.

``findings`` and ``worklist`` read the database directly through the same query functions as the API, so they
work with the API stopped.
"""

from __future__ import annotations

import json

import click

from omnict_node.cli import pass_node


def _session_factory(settings):
    from db.session import session_factory_for

    return session_factory_for(settings.database.url)


@click.command("api")
@click.option("--host", default=None, help="Listen address (default: api.host from the settings).")
@click.option("--port", type=int, default=None, help="Listen port (default: api.port from the settings).")
@click.option("--workers", type=int, default=1, show_default=True, help="uvicorn worker processes.")
@pass_node
def api(node, host: str | None, port: int | None, workers: int) -> None:
    """Serve the HTTP API, DICOMweb and the worklist web page with uvicorn."""
    import uvicorn

    from omnict_node.logs import configure_logging, log_event

    settings = node.settings
    configure_logging(settings.log_level)
    host, port = host or settings.api.host, port or settings.api.port
    import logging

    log_event(logging.getLogger("omnict.api"), "api.start", host=host, port=port, workers=workers)
    if workers > 1:
        # Worker processes import the app themselves; they read the same configuration (OMNICT_CONFIG / env).
        if node.config_file:
            import os

            os.environ["OMNICT_CONFIG"] = str(node.config_file)
        uvicorn.run("api.cli:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    log_level=settings.log_level.lower(), access_log=False)
        return
    from api.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level.lower(), access_log=False)


def app_from_environment():
    """uvicorn factory for multi-worker serving: settings from OMNICT_CONFIG and OMNICT_* variables."""
    from api.app import create_app
    from omnict_node.config import load_settings

    return create_app(load_settings())


@click.command("findings")
@click.argument("study_uid")
@click.option("--json", "as_json", is_flag=True, help="Print the same JSON as GET /studies/{uid}/findings.")
@click.option("--run", "run_number", type=int, default=None, help="Run number (default: newest run with results).")
@pass_node
def findings(node, study_uid: str, as_json: bool, run_number: int | None) -> None:
    """Show the findings of a study: questions, answers, codes, measurements, urgency."""
    from api.queries import NotFound, study_findings
    from api.settings import worklist_rules_from

    factory = _session_factory(node.settings)
    with factory() as session:
        try:
            result = study_findings(session, study_uid, worklist_rules_from(node.settings), run_number)
        except NotFound as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if result["run"] is None:
        click.echo(f"study {study_uid}: no results yet")
        return
    urgency = result["urgency"]
    click.echo(f"study {study_uid}  run {result['run']['run_number']} ({result['run']['state']})  "
               f"urgency {urgency['level'].upper()} score={urgency['urgency_score']:.2f}"
               + (f" priority={urgency['priority']:.2f}" if urgency["priority"] is not None else ""))
    for f in result["findings"]:
        present = {True: "present", False: "absent", None: "-"}[f["positive"]]
        code = f" [{f['code']['scheme']} {f['code']['value']} {f['code']['meaning']}]" if f["code"] else ""
        flag = " CRITICAL" if f["critical"] and f["positive"] is not False else ""
        click.echo(f"  {f['question_id']}: {present}{flag}{code}\n    Q: {f['question']}\n    A: {f['answer']}")
    if result["measurements"]:
        click.echo("  measurements:")
        for m in result["measurements"]:
            click.echo(f"    {m['organ']:<24} {m['volume_ml']:>10.1f} ml {m['mean_hu']:>8.1f} HU ± {m['std_hu']:.1f}")
    for r in result["results"]:
        click.echo(f"  result {r['kind']}: {r['sop_instance_uid']}")


@click.command("worklist")
@click.option("--status", default="unread,claimed", show_default=True, help="unread, claimed, completed or all.")
@click.option("--state", default=None, help="Only items whose run is in this state.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_node
def worklist(node, status: str, state: str | None, limit: int, as_json: bool) -> None:
    """Print the radiologists' worklist in priority order."""
    from api.routes.common import parse_statuses
    from api.settings import worklist_rules_from
    from api.worklist import OPEN_STATUSES, list_worklist

    factory = _session_factory(node.settings)
    with factory() as session:
        try:
            entries = list_worklist(session, worklist_rules_from(node.settings),
                                    statuses=parse_statuses([status], OPEN_STATUSES), run_state=state, limit=limit)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
        return
    click.echo(f"{'#':>3} {'level':<8} {'score':>8} {'wait h':>7} {'status':<9} {'order':<8} study / findings")
    for rank, e in enumerate(entries, 1):
        click.echo(f"{rank:>3} {e.level.upper():<8} {e.priority:>8.2f} {e.hours_waiting:>7.1f} {e.status:<9} "
                   f"{(e.requested_priority or '-'):<8} {e.study_instance_uid}"
                   + (f"  [{', '.join(e.positive_findings)}]" if e.positive_findings else ""))
