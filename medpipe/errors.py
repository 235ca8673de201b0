"""Errors that say what happened and how to fix it.

`RejectedInput` is not a failure of the pipeline: it is the verdict on one input file, carried to the
`rejected` output with a reason code from `REASONS`. Its detail must never contain header values or patient data.
"""

from __future__ import annotations


# Exit statuses of every command (README "Exit statuses"): 0 done; 1 done, with a finding (monitor: an alert;
# predict: a file could not be classified); 2 refused or failed (bad usage, input, config: nothing changed);
# 3 ran, but the result is a no-go (evaluate: not blessed; ingest: no record written); 130 interrupted.
EXIT_REFUSED = 2
EXIT_NO_GO = 3


class MedpipeError(Exception):
    """Base class of medpipe's user-facing errors; the CLI prints the message and exits with `exit_code` (2)."""

    exit_code = EXIT_REFUSED


class NoResult(MedpipeError):
    """The command ran to the end but produced nothing usable (e.g. ingest wrote no record): exit status 3."""

    exit_code = EXIT_NO_GO


class ConfigError(MedpipeError):
    """A configuration file or override is missing, malformed or inconsistent."""


class DataError(MedpipeError):
    """Input data (an ingest directory, a schema, a folder of images) is missing or does not fit the config."""


# Reason codes for rejected inputs, documented in docs/DESIGN.md. Keys are stable: stats.json, rejected.jsonl,
# metrics labels and alert rules use them.
REASONS: dict[str, str] = {
    "empty": "the file has no bytes",
    "not_image": "the content is not DICOM, PNG, JPEG or TIFF",
    "corrupt": "the file claims an image format but cannot be decoded",
    "truncated": "the image data ends early",
    "too_small": "the image is smaller than ingest.min_size",
    "pixel_budget": "the image has more pixels than ingest.max_pixels (decompression-bomb guard)",
    "no_pixel_data": "a DICOM object without Pixel Data (e.g. a structured report or RT structure set)",
    "unsupported_photometric": "a photometric interpretation or pixel layout medpipe does not convert",
    "missing_label": "no label for this file (manifest row or class folder missing)",
    "unknown_label": "the label is not in the config's label list",
    "label_conflict": "the same pixels appear under two different labels",
    "deid_key_missing": "a DICOM with a PatientID, but MEDPIPE_DEID_KEY is not set",
}


class RejectedInput(Exception):
    """One input cannot be used. `reason` is a key of REASONS; `detail` is safe to log (no PHI)."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; expected one of {sorted(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
