"""``omnict-node phantom``: write a synthetic CT study (DICOM + ground truth) to a folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


@click.command("phantom")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (CT/, LOCALIZER/, ground_truth.json, labels.npy, finding_mask.npy).")
@click.option("--slices", default=64, show_default=True, type=click.IntRange(1, 2000),
              help="Axial slices over the fixed 320 mm z range (spacing = 320/N mm).")
@click.option("--size", default=256, show_default=True, type=click.IntRange(16, 2048), help="Rows = columns.")
@click.option("--finding", "findings", multiple=True, metavar="TYPE[:key=value,...]",
              help="Repeatable, e.g. lung_nodule:lobe=lung_upper_lobe_right,size_mm=8 or kidney_stone:side=left.")
@click.option("--random-findings", type=click.IntRange(0, 10), default=None,
              help="Instead of --finding: up to N random findings drawn from the seed.")
@click.option("--seed", default=0, show_default=True, type=int, help="Patient seed (same seed -> same anatomy and UIDs).")
@click.option("--noise-hu", type=float, default=None, help="Quantum noise SD in HU (default: 10-20 from the seed).")
@click.option("--no-localizer", is_flag=True, help="Do not write the LOCALIZER series.")
@click.option("--nifti", is_flag=True, help="Also write labels.nii.gz (RAS affine).")
@click.option("--list-findings", is_flag=True, help="Print the finding types, parameters and limits, then exit.")
def phantom(out_dir: Path, slices: int, size: int, findings: tuple[str, ...], random_findings: int | None, seed: int,
            noise_hu: float | None, no_localizer: bool, nifti: bool, list_findings: bool) -> None:
    """Generate a synthetic chest/upper-abdomen CT study with organ labels and findings."""
    import numpy as np

    from omnict_core.phantom import FINDING_TYPES, PhantomSpec, generate_study, parse_finding, random_spec, write_dicom_study

    if list_findings:
        for name, info in FINDING_TYPES.items():
            params = ", ".join(f"{k}={'|'.join(v[1]) if v[0] == 'choice' else (f'{v[1][0]:g}-{v[1][1]:g}' if v[1] else 'number')}"
                               for k, v in info["params"].items())
            click.echo(f"{name}: {params}\n    limits: {info['limits']}")
        return
    try:
        parsed = [parse_finding(f) for f in findings]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--finding") from None
    if random_findings is not None:
        if parsed:
            raise click.UsageError("use either --finding or --random-findings")
        spec = random_spec(np.random.default_rng(seed), slices=slices, size=size, max_findings=random_findings,
                           noise_hu=noise_hu)
        spec.seed = seed
    else:
        spec = PhantomSpec(seed=seed, slices=slices, size=size, findings=parsed, noise_hu=noise_hu)
    t0 = time.perf_counter()
    study = generate_study(spec)
    t1 = time.perf_counter()
    paths = write_dicom_study(study, out_dir, localizer=not no_localizer, nifti=nifti)
    t2 = time.perf_counter()
    click.echo(json.dumps({
        "out": str(out_dir), "study_instance_uid": study.uids["study"], "ct_files": len(paths.ct_files),
        "localizer_files": len(paths.localizer_files), "ground_truth": str(paths.ground_truth),
        "spacing_zyx_mm": [round(v, 4) for v in study.spacing],
        "findings": [{"type": f.type, "location": f.location, "size_mm": round(f.size_mm, 1), "visible": f.visible}
                     for f in study.findings],
        "generate_s": round(t1 - t0, 3), "write_s": round(t2 - t1, 3)}, indent=1))
