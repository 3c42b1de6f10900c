"""``omnict-node ask``: answer questions about a CT (DICOM folder, NIfTI, NRRD, one slice) with an OmniCT checkpoint.

    omnict-node ask STUDY_DIR -q "liver::Is there a focal lesion?" -q "Is there free fluid?||Yes|No" [--report] [--json]

``organ::question`` selects the organ whose mask feeds OSE (a label name of the label map; 'kidneys' matches both
sides). ``question||a|b|c`` makes it a closed question answered with the likeliest of the answers a, b, c
(``Question.choices``; ``--json`` gives each one's log-likelihood). Label map: ``--labels`` (NIfTI/NRRD/.npy on the source grid, TotalSegmentator `total` names unless
``--label-names`` gives a JSON {id: name}); a phantom study folder's own ``labels.npy`` is used automatically.
Without a label map every question uses the whole-body OSE tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from omnict_node.cli import pass_node

# The shipped demo checkpoint, found relative to the repository (not the working directory).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "omnict-tiny-phantom"


def parse_question(text: str):
    """``[organ::]question[||choice|choice...]`` -> Question."""
    from omnict_core.inference.engine import Question

    text, has_choices, choice_text = text.partition("||")
    choices = tuple(c.strip() for c in choice_text.split("|")) if has_choices else None
    organ, sep, question = text.partition("::")
    if not sep:
        return Question(text.strip(), choices=choices)
    return Question(question.strip(), organ.strip() or None, choices=choices)


def _label_source(source: Path, labels: Path | None, label_names: Path | None):
    """(label array or path, {id: name}) or (None, {})."""
    if labels is None and source.is_dir() and (source / "labels.npy").is_file():
        from omnict_core.phantom import LABELS

        return (source / "labels.npy"), dict(LABELS)
    if labels is None:
        return None, {}
    if label_names is not None:
        names = {int(k): str(v) for k, v in json.loads(label_names.read_text()).items()}
    else:
        from omnict_core.segmentation.base import TOTAL_LABELS

        names = dict(TOTAL_LABELS)
    return labels, names


@click.command("ask")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("-q", "--question", "questions", multiple=True,
              help="Question; 'organ::question' selects the OSE organ, 'question||Yes|No' ranks the given answers.")
@click.option("--report", "with_report", is_flag=True, help="Also generate a long-form report.")
@click.option("--checkpoint", "-m", type=click.Path(path_type=Path), default=None,
              help="OmniCT checkpoint directory (default: the model.checkpoint setting, else "
                   "checkpoints/omnict-tiny-phantom).")
@click.option("--labels", type=click.Path(exists=True, path_type=Path), default=None,
              help="Organ label map on the source grid (.nii.gz, .nrrd, .npy).")
@click.option("--label-names", type=click.Path(exists=True, path_type=Path), default=None,
              help="JSON {label id: name} for --labels (default: TotalSegmentator 'total' names).")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--report-tokens", type=int, default=160, show_default=True)
@click.option("--device", default=None, help="torch device (default: model.device setting).")
@click.option("--no-relevance", is_flag=True, help="Skip the per-unit relevance (key slice) pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the answers as JSON.")
@pass_node
def ask(node, source: Path, questions: tuple[str, ...], with_report: bool, checkpoint: Path | None,
        labels: Path | None, label_names: Path | None, max_new_tokens: int, report_tokens: int, device: str | None,
        no_relevance: bool, as_json: bool) -> None:
    """Answer questions about a CT study with OmniCT (greedy, deterministic)."""
    if not questions and not with_report:
        raise click.UsageError("give at least one --question or --report")
    settings = node.settings
    checkpoint = checkpoint or settings.model.checkpoint or DEFAULT_CHECKPOINT
    device = device or settings.model.device
    if not (Path(checkpoint) / "config.json").is_file():
        raise click.ClickException(f"OmniCT checkpoint not found: {checkpoint} (no config.json); train one with "
                                   "'omnict-node train' or pass --checkpoint")

    from omnict_core.inference.engine import OmniCTEngine, answers_as_dicts
    from omnict_core.preprocessing import prepare_input

    engine = OmniCTEngine(checkpoint, device=device, max_new_tokens=max_new_tokens)
    label_source, names = _label_source(source, labels, label_names)
    try:
        study = prepare_input(source, engine.config, labels=label_source, label_names=names)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise click.ClickException(f"cannot read {source}: {exc}") from exc
    try:
        parsed = [parse_question(q) for q in questions]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    answers = engine.ask(study, parsed, with_relevance=not no_relevance)
    if with_report:
        answers.append(engine.report(study, max_new_tokens=report_tokens, with_relevance=not no_relevance))
    if as_json:
        json.dump({"source": str(source), "kind": study.kind, "units": study.num_units,
                   "answers": answers_as_dicts(answers)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    for answer in answers:
        organ = f" [{answer.organ}]" if answer.organ else ""
        click.echo(f"Q{organ}: {answer.question}\nA: {answer.text}")
        if answer.key_slices:
            click.echo(f"   key slices: {answer.key_slices} (units {answer.key_units})")
