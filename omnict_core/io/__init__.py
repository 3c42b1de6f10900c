"""DICOM input: series selection and volume building shared by the node pipeline and the model preprocessing."""

from .dicom_series import (CtVolume, DicomSeriesError, InconsistentGeometryError, InstanceInfo, MixedSeriesError,
                           NoImageError, Problem, RejectedSeries, SeriesChoice, VolumeReport, classify_orientation,
                           dicom_files, group_by_series, instance_info, load_series_from_folder, load_volume,
                           read_instance, select_ct_series)

__all__ = ["CtVolume", "DicomSeriesError", "InconsistentGeometryError", "InstanceInfo", "MixedSeriesError",
           "NoImageError", "Problem", "RejectedSeries", "SeriesChoice", "VolumeReport", "classify_orientation",
           "dicom_files", "group_by_series", "instance_info", "load_series_from_folder", "load_volume",
           "read_instance", "select_ct_series"]
