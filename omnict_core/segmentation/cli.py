"""``omnict-node segment INPUT``: segment a DICOM series folder or a NIfTI file, write a NIfTI label map and a JSON
file with per-organ volume (ml) and HU mean/std."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click
import numpy as np

from omnict_core.segmentation.base import SegmentationError

logger = logging.getLogger("omnict.segmentation")


def load_input(path: Path) -> tuple[np.ndarray, tuple[float, float, float], tuple[str, str, str], np.ndarray]:
    """HU volume (z, y, x), spacing, axis codes and a RAS NIfTI affine for the label map, from a NIfTI file or a
    folder holding one DICOM CT series."""
    if path.is_file() and (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        import nibabel as nib

        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        if data.ndim != 3:
            raise SegmentationError(f"{path}: expected a 3-D NIfTI volume, got shape {data.shape}")
        slope, intercept = image.header.get_slope_inter()
        hu = np.asarray(data.transpose(2, 1, 0), dtype=np.float32 if slope not in (None, 1) else data.dtype)
        codes = tuple(reversed(nib.aff2axcodes(image.affine)))
        spacing = tuple(float(z) for z in reversed(image.header.get_zooms()[:3]))
        return np.ascontiguousarray(hu), spacing, codes, image.affine  # type: ignore[return-value]
    if path.is_dir():
        return _load_dicom_folder(path)
    raise SegmentationError(f"{path}: not a NIfTI file (.nii/.nii.gz) or a DICOM folder")


def _load_dicom_folder(folder: Path) -> tuple[np.ndarray, tuple[float, float, float], tuple[str, str, str], np.ndarray]:
    """The CT series in a folder, through the node's DICOM reader (series selection, slice sorting, HU rescale)."""
    from omnict_core.io import DicomSeriesError, load_series_from_folder

    from omnict_core.segmentation.base import axis_codes_from_ct_volume

    try:
        _, volume = load_series_from_folder(folder)
    except DicomSeriesError as exc:
        raise SegmentationError(f"{folder}: {exc}") from exc
    # CtVolume.affine maps (x, y, z index) to LPS mm; the NIfTI label map is stored (x, y, z) in RAS.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(volume.affine, dtype=float)
    spacing = tuple(float(s) for s in volume.spacing)
    return volume.hu, spacing, axis_codes_from_ct_volume(volume), affine  # type: ignore[return-value]


@click.command("segment")
@click.argument("input_path", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True,
              help="Label map to write (.nii.gz); the measurements go next to it as <name>.json.")
@click.option("--backend", type=click.Choice(["classical", "totalsegmentator"]), default=None,
              help="Default: settings model.segmentation_backend.")
@click.option("--weights-dir", type=click.Path(path_type=Path), default=None,
              help="Local TotalSegmentator weights (default: settings model.totalseg_weights). Never downloaded.")
@click.option("--full/--fast", "full", default=False, help="TotalSegmentator 1.5 mm five-part model (default 3 mm).")
@click.option("--device", default=None, help="torch device for TotalSegmentator (default: settings model.device).")
@click.pass_context
def segment(ctx: click.Context, input_path: Path, output: Path, backend: str | None, weights_dir: Path | None,
            full: bool, device: str | None) -> None:
    """Segment organs in INPUT_PATH (DICOM series folder or NIfTI file)."""
    import nibabel as nib

    from omnict_core.segmentation import make_segmenter, measure_organs

    settings = _settings(ctx)
    backend = backend or (settings.model.segmentation_backend if settings else "classical")
    weights_dir = weights_dir or (settings.model.totalseg_weights if settings else None)
    device = device or (settings.model.device if settings else "cpu")
    try:
        hu, spacing, codes, affine = load_input(input_path)
        segmenter = make_segmenter(backend, weights_dir=weights_dir, fast=not full, device=device)
        started = time.perf_counter()
        result = segmenter.segment(hu, spacing, codes)
        seconds = time.perf_counter() - started
    except SegmentationError as exc:
        raise click.ClickException(str(exc)) from exc
    organs = measure_organs(result.label_map, hu, spacing, result.labels)
    output.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(result.label_map.transpose(2, 1, 0)), affine), str(output))
    report = {
        "backend": result.backend, "backend_version": result.backend_version, "seconds": round(seconds, 2),
        "shape_zyx": list(hu.shape), "spacing_zyx_mm": list(spacing), "axis_codes": list(codes),
        "labels": {str(v): n for v, n in sorted(result.labels.items())},
        "organs": {name: m.as_dict() for name, m in sorted(organs.items())},
    }
    json_path = _json_path(output)
    json_path.write_text(json.dumps(report, indent=2))
    from omnict_node.logs import log_event

    log_event(logger, "segmentation.done", backend=result.backend, organs=len(result.labels),
              seconds=round(seconds, 2))
    click.echo(f"{len(result.labels)} labels, {seconds:.1f} s -> {output} + {json_path}")


def _json_path(output: Path) -> Path:
    name = output.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return output.with_name(name + ".json")


def _settings(ctx: click.Context):
    """Node settings when run under ``omnict-node`` (its context object), else None (plain defaults)."""
    node = ctx.find_root().obj
    try:
        return node.settings if node is not None and hasattr(node, "settings") else None
    except Exception:  # noqa: BLE001 - an unreadable config file is reported by the node's own commands
        return None
