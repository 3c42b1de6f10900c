"""``omnict-node``: the one command line of the node. Thin: each subcommand lives with the package it drives
and is imported only when used, so ``omnict-node phantom`` does not pay for pynetdicom or torch it does not need."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

# name -> "module:attribute" of a click command, imported on first use.
LAZY_COMMANDS: dict[str, str] = {
    "serve": "omnict_node.serve:serve",
    "status": "omnict_node.status:status",
    "demo": "omnict_node.demo:demo",
    "db": "db.cli:db",
    "study": "workers.cli:study",
    "worker": "workers.cli:worker",
    "scp": "dicom_node.cli:scp",
    "phantom": "omnict_core.phantom.cli:phantom",
    "train": "omnict_core.training.cli:train",
    "build-data": "omnict_core.data.build:main",
    "eval": "omnict_core.evaluation.cli:eval_command",
    "segment": "omnict_core.segmentation.cli:segment",
    "ask": "omnict_core.inference.cli:ask",
    "api": "api.cli:api",
    "findings": "api.cli:findings",
    "worklist": "api.cli:worklist",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None or name not in LAZY_COMMANDS:
            return command
        module_name, attribute = LAZY_COMMANDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise click.ClickException(f"'{name}' is not available in this build ({module_name} missing)") from exc
            raise
        return getattr(module, attribute)


class NodeContext:
    """Carries the --config choice; settings load on first use."""

    def __init__(self, config_file: Path | None) -> None:
        self.config_file = config_file
        self._settings = None

    @property
    def settings(self):
        if self._settings is None:
            from omnict_node.config import load_settings

            self._settings = load_settings(self.config_file)
        return self._settings


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), envvar="OMNICT_CONFIG",
              help="TOML configuration file (OMNICT_* environment variables override it).")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """OmniCT PACS node: DICOM in, segmentation + OmniCT, DICOM SR/SEG/KOS out."""
    ctx.obj = NodeContext(config_file)


pass_node = click.make_pass_decorator(NodeContext)
