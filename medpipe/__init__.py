"""medpipe: medical imaging pipelines from DICOM and image files to a served classifier."""

__version__ = "0.1.0"
