"""What the stages read and write around the models: slice pixels read at their offset, the volume decoded straight
into its .npy file, the embedded broker's hand-off polling, the worker's warm marker."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless,
                         generate_uid)

from omnict_core.io.dicom_series import load_volume, read_instance
from omnict_node.config import load_settings

ROWS, COLUMNS, SLICES = 24, 20, 5


def write_series(folder: Path, *, syntax: str = ExplicitVRLittleEndian, bits: int = 16, stored: int = 16,
                 signed: bool = False, slope: float = 1.0, intercept: float = -1024.0, compress: bool = False,
                 seed: int = 0) -> list[Path]:
    """A small CT series with random pixel values filling all allocated bits (high bits above BitsStored too)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    paths = []
    for index in range(SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber, ds.SeriesNumber = SLICES - index, 2  # numbers against position: sorting is by position
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, -12.0, 50.0 - 2.5 * index]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.8], 2.5
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, int(signed)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        info = np.iinfo(dtype)
        ds.PixelData = rng.integers(info.min, info.max, size=(ROWS, COLUMNS), endpoint=True, dtype=dtype).tobytes()
        if compress:
            ds.compress(RLELossless)
        path = folder / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_hu(paths: list[Path]) -> np.ndarray:
    """pydicom's own decoding (pixel handlers), sorted by position along the normal, rescaled."""
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope) + np.float32(ds.RescaleIntercept)
                     for ds in datasets])


@pytest.mark.parametrize("integer_when_exact", [False, True])
@pytest.mark.parametrize(("name", "options", "offset_read", "integer"), [
    ("explicit, 12 of 16 bits unsigned, garbage above", dict(stored=12), True, True),
    ("implicit VR", dict(syntax=ImplicitVRLittleEndian), True, False),  # 16 bits unsigned - 1024: beyond int16
    ("signed 16 bits", dict(signed=True, intercept=0.0), True, True),
    ("8 bits, slope 2", dict(bits=8, stored=8, slope=2.0, intercept=-100.0), True, False),
    ("signed 12 of 16 bits: pydicom's sign correction", dict(signed=True, stored=12, intercept=0.0), False, True),
    ("RLE compressed: pydicom decodes", dict(compress=True), False, False),
])
def test_volume_pixels_equal_pydicoms_decoding(tmp_path: Path, name: str, options: dict, offset_read: bool,
                                               integer: bool, integer_when_exact: bool) -> None:
    """The same HU values whatever the encoding; int16 only when asked and every value is an integer in its range
    (a 16-bit unsigned series minus 1024 reaches past 32767: decoded again as float32)."""
    paths = write_series(tmp_path / "ct", **options)
    infos = [read_instance(p) for p in paths]
    assert all((info.pixel_layout is not None) == offset_read for info in infos), name
    volume = load_volume(infos, integer_when_exact=integer_when_exact)
    assert volume.hu.dtype == (np.int16 if integer and integer_when_exact else np.float32)
    np.testing.assert_array_equal(volume.hu, expected_hu(paths))
    assert volume.shape == (SLICES, ROWS, COLUMNS)


def test_volume_is_decoded_into_the_callers_array(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", stored=12)
    target = tmp_path / "volume.npy"
    mapped = []

    def allocate(shape, dtype):
        mapped.append(np.lib.format.open_memmap(target, mode="w+", dtype=dtype, shape=shape))
        return mapped[-1]

    volume = load_volume(paths, allocate=allocate)
    assert volume.hu is mapped[0] and volume.hu.dtype == np.float32
    np.testing.assert_array_equal(np.load(target), expected_hu(paths))
    volume = load_volume(paths, allocate=allocate, integer_when_exact=True)
    assert volume.hu is mapped[1] and volume.hu.dtype == np.int16
    np.testing.assert_array_equal(np.load(target), expected_hu(paths))
    with pytest.raises(ValueError, match="float32"):
        load_volume(paths, allocate=lambda shape, dtype: np.empty(shape, np.float64))


def test_embedded_broker_hands_off_within_a_poll_of_50_ms(tmp_path: Path) -> None:
    from workers.celery_app import FILESYSTEM_POLLING_INTERVAL_S, make_celery

    app = make_celery(load_settings(data_dir=str(tmp_path / "node")))
    assert app.conf.broker_transport_options["polling_interval"] == FILESYSTEM_POLLING_INTERVAL_S <= 0.05
    with app.connection_for_read() as connection:  # kombu's transport takes it up
        assert connection.transport.polling_interval == FILESYSTEM_POLLING_INTERVAL_S


def _preloaded_worker(settings, queues: tuple[str, ...]):
    """The current app as in a worker process consuming ``queues``, preloaded until its warm marker appears."""
    from workers.celery_app import make_celery
    from workers.tasks import start_preloading, warm_marker, worker_resources

    app = make_celery(settings)
    app.omnict_queues = queues
    marker = warm_marker(settings.data_dir, __import__("os").getpid())
    start_preloading()
    deadline = time.monotonic() + 180
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    return worker_resources(app)


def test_worker_marks_itself_warm_after_preloading(tmp_path: Path) -> None:
    from workers.tasks import remove_warm_marker, warm_marker

    settings = load_settings(data_dir=str(tmp_path / "node"))
    _preloaded_worker(settings, ())  # asserts the warm marker appears
    marker = warm_marker(settings.data_dir, __import__("os").getpid())
    import sys

    from celery import current_app

    assert {"reports", "dicom_node.delivery", "api.worklist"} <= set(sys.modules)
    assert current_app.omnict_imported.is_set()  # tasks go ahead at once (wait_for_imports): no import races preload
    remove_warm_marker()
    assert not marker.exists()


def test_a_task_waits_for_its_workers_preload_to_import_the_stage_dependencies(tmp_path: Path) -> None:
    import threading

    from celery.signals import task_prerun

    from workers.celery_app import make_celery

    app = make_celery(load_settings(data_dir=str(tmp_path / "node")))
    app.omnict_imported = threading.Event()  # as start_preloading leaves it while its thread imports
    task = type("Task", (), {"app": app})()  # what the signal gets: the task, bound to its app
    released = threading.Event()
    thread = threading.Thread(target=lambda: (task_prerun.send(sender=task, task=task, task_id="t", args=(),
                                                               kwargs={}), released.set()))
    thread.start()
    assert not released.wait(0.5)  # held before its body: no import of its own races the preload's
    app.omnict_imported.set()
    assert released.wait(10)
    thread.join()


def test_gpu_worker_loads_its_models_before_marking_itself_warm(tmp_path: Path) -> None:
    """A gpu-queue worker has the segmenter and the OmniCT engine loaded when it is warm; the stages then use those
    same objects (one load per process), not new ones."""
    from workers.stages.infer import engine_for
    from workers.stages.segment import segmenter_for
    from workers.tasks import remove_warm_marker

    settings = load_settings(data_dir=str(tmp_path / "node"))
    resources = _preloaded_worker(settings, ("cpu", "gpu"))
    try:
        loaded = dict(resources.cache)
        assert "segmenter" in loaded and any(key.startswith("engine:") for key in loaded), sorted(loaded)
        engine = next(v for k, v in loaded.items() if k.startswith("engine:"))
        assert engine_for(resources) is engine and segmenter_for(resources) is loaded["segmenter"]
    finally:
        remove_warm_marker()


def test_cpu_worker_loads_no_model_and_a_missing_checkpoint_is_logged_not_fatal(tmp_path: Path, caplog) -> None:
    from workers.pipeline import PermanentStageError
    from workers.stages.infer import engine_for
    from workers.tasks import load_models, remove_warm_marker

    settings = load_settings(data_dir=str(tmp_path / "node"))
    resources = _preloaded_worker(settings, ("cpu",))
    remove_warm_marker()
    assert resources.cache == {}

    missing = tmp_path / "no-checkpoint"
    settings = load_settings(data_dir=str(tmp_path / "node2"), model={"checkpoint": str(missing)})
    resources = type(resources).from_settings(settings)
    with caplog.at_level("WARNING", logger="omnict.tasks"):
        load_models(resources)  # the segmenter loads; the engine's failure is logged
    assert "segmenter" in resources.cache
    assert any("worker.model_preload_failed" in r.getMessage() and "omnict_engine" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    with pytest.raises(PermanentStageError, match=str(missing)):  # the stage reports it, with the path
        engine_for(resources)


def test_the_series_headers_read_by_assemble_serve_later_stages_until_a_file_changes(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    from omnict_core.io.dicom_series import select_ct_series
    from workers.pipeline import StageContext, WorkerResources

    assemble_stage = importlib.import_module("workers.stages.assemble")  # the package exports the function by that name

    paths = write_series(tmp_path / "series")
    settings = load_settings(data_dir=str(tmp_path / "node"))
    context = StageContext(1, 1, "1.2.3", settings, None, tmp_path / "work", {"assemble": {"series_instance_uid": "s"}},
                           WorkerResources(settings, session_factory=None))
    monkeypatch.setattr(assemble_stage, "study_files_by_series", lambda _context: {"s": paths})
    choice = select_ct_series({"s": paths})
    assemble_stage._remember_source_headers(context, paths, choice.instances)

    cached = assemble_stage.source_series(context)
    headers = [i.dataset for i in choice.instances]
    assert all(any(ds is header for header in headers) for ds in cached.datasets)  # the very headers, not re-read
    assert [float(ds.ImagePositionPatient[2]) for ds in cached.datasets] == [40.0, 42.5, 45.0, 47.5, 50.0]
    assert assemble_stage.source_series(context) is cached

    replaced = pydicom.dcmread(paths[0])  # the PACS sends an instance again: a new file in its place
    replaced.SeriesDescription = "re-sent"
    replaced.save_as(paths[0].with_suffix(".new"), enforce_file_format=True)
    paths[0].with_suffix(".new").replace(paths[0])
    fresh = assemble_stage.source_series(context)
    assert fresh is not cached
    assert fresh.dataset_for(str(replaced.SOPInstanceUID)).SeriesDescription == "re-sent"


def test_protocol_questions_are_ranked_yes_no_unless_generation_is_configured() -> None:
    """model.closed_answers: 'rank' gives every protocol question the two trained answers as its choices (the engine
    then answers with the likelier); 'generate' leaves them free."""
    from workers.protocol import load_protocol
    from workers.stages.infer import battery_questions

    protocol = load_protocol()
    battery = [(q, q.roi) for q in protocol.questions[:3]]
    ranked = battery_questions(battery, "rank")
    assert [(q.text, q.organ) for q in ranked] == [(p.text, p.roi) for p in protocol.questions[:3]]
    assert all(q.choices == ("Yes", "No") for q in ranked)
    assert all(q.choices is None for q in battery_questions(battery, "generate"))
