"""Data I/O: the Zarr case store, NIfTI/DICOM ingest, X-ray and volume readers/writers, splits, previews."""
