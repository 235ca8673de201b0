"""Builders for adversarial and edge-case input files, made at test time from the real samples in sample_data/.

Nothing here is a mock: each function writes a real file that a hospital export or an attacker could produce
(a truncated JPEG, a PNG whose header claims 10^10 pixels, a DICOM carrying PHI in two dozen tags...).
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
SAMPLE_MRI = SAMPLE / "brain_mri"
SAMPLE_DICOM = SAMPLE / "dicom"

# Distinctive markers: none of them can occur by chance in PNG/gzip bytes or JSON.
PHI_PATIENT_ID = "PHIZQX-MRN-004711"


def sample_jpegs(label: str, count: int) -> list[Path]:
    return sorted((SAMPLE_MRI / label).iterdir())[:count]


def truncated_jpeg(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def zero_bytes(target: Path) -> Path:
    target.write_bytes(b"")
    return target


def text_named_dcm(target: Path) -> Path:
    target.write_text("Patient list exported from the RIS\nnot an image, whatever its name says\n")
    return target


def large_png(target: Path, width: int, height: int) -> Path:
    """A real, fully decodable PNG with many pixels (compresses to a few KB)."""
    Image.new("L", (width, height), 7).save(target, "PNG")
    return target


def png_bomb_header(target: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose IHDR claims width x height pixels: a decompression bomb as seen by the header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    target.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return target


def tiny_png(target: Path, side: int = 16) -> Path:
    Image.new("L", (side, side), 100).save(target, "PNG")
    return target


def jpeg_named_png(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    return target


def tiff_16bit(target: Path, pages: list[np.ndarray]) -> Path:
    """A (multi-page) 16-bit grey TIFF."""
    images = [Image.fromarray(page.astype(np.uint16), "I;16") for page in pages]
    images[0].save(target, "TIFF", save_all=len(images) > 1, append_images=images[1:])
    return target


def png_16bit(target: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint16), "I;16").save(target, "PNG")
    return target


# DICOM attributes a real export might carry, each set to a unique marker string. None is allow-listed.
PHI_TAGS: dict[str, str] = {
    "PatientName": "PHIZQX^Name^Alice",
    "PatientID": PHI_PATIENT_ID,
    "OtherPatientIDs": "PHIZQX-OTHER-ID-55",
    "PatientAddress": "PHIZQX 12 Hospital Road",
    "PatientTelephoneNumbers": "PHIZQX-555-0199",
    "PatientMotherBirthName": "PHIZQX^Mother",
    "PatientComments": "PHIZQX comment about the patient",
    "AdditionalPatientHistory": "PHIZQX history of present illness",
    "Occupation": "PHIZQX-job",
    "AccessionNumber": "PHIZQX-ACC-9",
    "StudyID": "PHIZQXSTUDY",
    "StudyDescription": "PHIZQX study description",
    "SeriesDescription": "PHIZQX series description",
    "InstitutionName": "PHIZQX General Hospital",
    "InstitutionAddress": "PHIZQX 1 Main Street",
    "InstitutionalDepartmentName": "PHIZQX Radiology",
    "ReferringPhysicianName": "PHIZQX^Referrer",
    "PerformingPhysicianName": "PHIZQX^Performer",
    "NameOfPhysiciansReadingStudy": "PHIZQX^Reader",
    "OperatorsName": "PHIZQX^Operator",
    "RequestingPhysician": "PHIZQX^Requester",
    "StationName": "PHIZQX-STATION",
    "DeviceSerialNumber": "PHIZQX-SERIAL-42",
    "ImageComments": "PHIZQX burned-in note",
    "MedicalRecordLocator": "PHIZQX-LOCATOR",
}
PHI_DATES = {"PatientBirthDate": "18990101"}  # odd enough never to occur by chance


def phi_dicom(target: Path, source: Path = SAMPLE_DICOM / "CT-MONO2-16-brain.dcm") -> list[str]:
    """A real CT slice with PHI planted in 26 tags plus a private tag; returns every planted string."""
    import pydicom

    ds = pydicom.dcmread(source, force=True)
    for keyword, value in {**PHI_TAGS, **PHI_DATES}.items():
        setattr(ds, keyword, value)
    block = ds.private_block(0x0011, "PHIZQX PRIVATE CREATOR", create=True)
    block.add_new(0x01, "LO", "PHIZQX private value")
    ds.save_as(target)
    return [*PHI_TAGS.values(), *PHI_DATES.values(), "PHIZQX private value", "PHIZQX"]


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def mr_dicom_from_jpeg(source: Path, target: Path, *, study_uid: str, series_uid: str, sop_uid: str,
                       study_date: str = "20261102", instance_number: int = 1, phi: bool = True,
                       accession: str = "", modality: str = "MR") -> list[str]:
    """A real brain MRI slice (sample JPEG) wrapped as an MR Image Storage object, PHI planted in 26 tags plus a
    private tag when `phi`; returns the planted strings (those a log must never show)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    pixels = np.asarray(Image.open(source).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.BodyPartExamined = modality, "BRAIN"
    ds.StudyDate, ds.SeriesDate, ds.StudyTime = study_date, study_date, "101500"
    ds.SeriesNumber, ds.InstanceNumber = 1, instance_number
    ds.PatientSex, ds.ReferringPhysicianName = "O", ""
    ds.AccessionNumber = accession
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    planted: list[str] = []
    if phi:
        for keyword, value in {**PHI_TAGS, **PHI_DATES}.items():
            if keyword == "AccessionNumber" and accession:
                continue
            setattr(ds, keyword, f"{value}-{study_uid[-6:]}" if keyword == "PatientID" else value)
            planted.append(str(getattr(ds, keyword)))
        block = ds.private_block(0x0011, "PHIZQX PRIVATE CREATOR", create=True)
        block.add_new(0x01, "LO", "PHIZQX private value")
        planted += ["PHIZQX private value", "PHIZQX"]
    else:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "", "", ""
    ds.save_as(target, enforce_file_format=True)
    return planted


# ---- deflated DICOM (PS3.5 A.5): the dataset is one raw deflate stream, so a small file can inflate to gigabytes --
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def deflated_dicom(rows: int, cols: int, bits: int = 16, pixel_bytes: int | None = None, zeros: bool = False,
                   level: int = 6, trailing_bytes: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian MONOCHROME2 instance of rows x cols at `bits` (8 or 16), built as a
    stream: the pixels (a ramp per row, or zeros) are deflated row by row, never held whole in memory.
    pixel_bytes: the Pixel Data length to write (default: what the geometry declares); more than declared makes
    a decompression bomb whose header looks like a small image. trailing_bytes: a Data Set Trailing Padding
    element (FFFC,FFFC) of that many zeros after the pixels: a bomb whose Pixel Data is honest."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE_STORAGE, sop
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.BodyPartExamined = PHI_PATIENT_ID, "MR", "BRAIN"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    declared = rows * cols * bits // 8
    length = declared if pixel_bytes is None else pixel_bytes
    length += length & 1
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW" if bits > 8 else b"OB", 0, length)
    dtype = np.uint16 if bits > 8 else np.uint8
    row = (np.zeros(cols, dtype) if zeros else (np.arange(cols) % (2 ** min(bits, 12))).astype(dtype)).tobytes()
    block = row * max(1, (1 << 20) // len(row))
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [b"\0" * 128 + b"DICM" + head.getvalue(), compressor.compress(body.getvalue() + element)]
    left = length
    while left > 0:
        piece = block[:left]
        parts.append(compressor.compress(piece))
        left -= len(piece)
    if trailing_bytes:
        parts.append(compressor.compress(struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, trailing_bytes)))
        zeros_block = bytes(1 << 20)
        left = trailing_bytes
        while left > 0:
            piece = zeros_block[:left]
            parts.append(compressor.compress(piece))
            left -= len(piece)
    parts.append(compressor.flush())
    return b"".join(parts)


def png16(width: int, height: int) -> bytes:
    """A real 16-bit grey PNG of width x height (a ramp per row), built row by row like gateway_support.huge_png:
    7000 x 7000 is ~0.5 MB on disk and 98 MB of pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" + (np.arange(width) % 4096).astype(">u2").tobytes()
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return (PNG16_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


PNG16_MAGIC = b"\x89PNG\r\n\x1a\n"


def twelve_bit_mr(source: Path, window: bool) -> bytes:
    """A sample JPEG as a 12-bit MR instance, as a scanner would store it: pixels x16 (0..4080), BitsStored 12, and a
    VOI window covering that range only when `window` (issue 28's parity check: the answer must not depend on it)."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(source).convert("L")).astype(np.uint16) * 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE_STORAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "MR", *pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    if window:
        ds.WindowCenter, ds.WindowWidth = 2040, 4080
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def dicom_parity(version: Path, jpegs: list, windows=(False, True)) -> dict:
    """How often the served model (the SavedModel's serving signature, host preprocessing from its own assets) gives
    a 12-bit MR DICOM of each JPEG the JPEG's own class: {"no_window": same, "window": same, "images": n}."""
    import json

    import tensorflow as tf

    from medpipe.config import config_from_dict
    from medpipe.imaging import preprocess_bytes

    params = json.loads((version / "assets" / "preprocessing.json").read_text())
    config = config_from_dict({"name": "parity", "task": params["task"], "labels": params["labels"],
                               "image": {"size": params["image_size"], "channels": params["channels"]},
                               "dicom": params["dicom"], "ingest": params["ingest"]})
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]

    def classes(images: list) -> np.ndarray:
        pngs = [preprocess_bytes(data, config).png for data in images]
        return serve(image_bytes=tf.constant(pngs))["class_ids"].numpy().reshape(-1)

    reference = classes([Path(p).read_bytes() for p in jpegs])
    return {"images": len(jpegs), **{("window" if window else "no_window"):
                                      int((classes([twelve_bit_mr(p, window) for p in jpegs]) == reference).sum())
                                      for window in windows}}
