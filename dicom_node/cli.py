"""``omnict-node scp``: run only the storage SCP (for debugging; ``omnict-node serve`` embeds the same SCP).

Also runnable as ``python -m dicom_node.cli [--config FILE] [--port N] [--migrate]``.
"""

from __future__ import annotations

import faulthandler
import signal
import threading

import click

from omnict_node.cli import pass_node


def run_scp(settings, migrate: bool = False, fast_path: bool = True) -> None:
    """Start the SCP on ``settings`` and block until SIGINT/SIGTERM."""
    from db.session import make_engine, make_session_factory
    from dicom_node.scp import StorageSCP
    from omnict_node.logs import configure_logging

    configure_logging(settings.log_level)
    if migrate:
        from db.migrate import upgrade

        upgrade(str(settings.database.url))
    engine = make_engine(str(settings.database.url), echo=settings.database.echo)
    scp = StorageSCP(settings, make_session_factory(engine), fast_path=fast_path)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: thread stacks to stderr
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    scp.start()
    try:
        # Timed waits: a signal delivered to another thread only runs its Python handler when the main thread
        # wakes up, and an untimed lock wait may never wake.
        while not stop.wait(0.5):
            pass
    finally:
        scp.stop()
        engine.dispose()


@click.command("scp")
@click.option("--port", type=int, default=None, help="Listen on this port instead of dicom.port (0: any free port).")
@click.option("--migrate/--no-migrate", default=False, help="Apply database migrations before listening.")
@click.option("--fast-path/--no-fast-path", default=True, help="pynetdicom speed-ups (dicom_node.fastpath).")
@pass_node
def scp(node, port: int | None, migrate: bool, fast_path: bool) -> None:
    """Run only the DICOM storage SCP (C-ECHO, C-STORE) until interrupted."""
    settings = node.settings
    if port is not None:
        settings.dicom.port = port
    run_scp(settings, migrate=migrate, fast_path=fast_path)


if __name__ == "__main__":  # pragma: no cover
    import sys

    from omnict_node.cli import main

    # `python -m dicom_node.cli [--config F] [scp options]` == `omnict-node [--config F] scp [scp options]`
    args = sys.argv[1:]
    head = args[:2] if args[:1] == ["--config"] else []
    main(args=head + ["scp"] + args[len(head):])
