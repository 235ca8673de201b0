"""PACS doors' memory: how much a `medpipe gateway` process grows while it receives one very large instance.

    .venv/bin/python benchmarks/bench_pacs_memory.py [--baseline-checkout /path/to/older/checkout]

For each case a fresh gateway process (DIMSE SCP + STOW-RS, max_instance_mb 256, nothing processed: the stability
window is an hour) receives one instance from another process; the figure is the growth of the gateway's peak RSS
(VmHWM) over its peak after start-up and a small warm-up C-STORE. Cases: a 300 MB C-STORE (over max_instance_mb:
refused with A700), a 200 MB C-STORE and a 200 MB STOW-RS (both stored). With --baseline-checkout the same cases run
against that checkout's code too (e.g. the revision before C-STORE streaming), in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from pacs_support import SENDER  # noqa: E402
MR = "1.2.840.10008.5.1.4.1.1.4"
BENCH_KEY = "bench-pacs-key-not-a-secret"  # pseudonyms of synthetic instances only


def big_mr(target: Path, megabytes: float) -> Path:
    """An MR instance of about `megabytes` (16-bit zeros), written in 1 MiB pieces."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    columns = 8192
    rows = max(1, int(megabytes * 2**20 / (columns * 2)))
    study = f"2.25.{uuid.uuid4().int}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR, f"{study}.1.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = MR, f"{study}.1.1", study, f"{study}.1"
    ds.Modality = "MR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.save_as(target, enforce_file_format=True)
    size = rows * columns * 2
    with open(target, "ab") as handle:
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size))
        piece = bytes(2**20)
        for start in range(0, size, len(piece)):
            handle.write(piece[:min(len(piece), size - start)])
    return target


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


class Gateway:
    def __init__(self, checkout: Path, folder: Path):
        from pacs_support import DICOM_LINE
        from serving.listen import LISTENING

        (folder / "pacs.yaml").write_text(f"spool: {folder / 'spool'}\ncalling_aets: [MEDPIPETEST]\n"
                                          "stable_seconds: 3600\nmax_instance_mb: 256\n"
                                          "routes: [{model: brain_mri, modalities: [MR]}]\n")
        (folder / "gateway.yaml").write_text("limits:\n  max_body_mb: 512\n")
        log = folder / "gateway.log"
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serving.gateway", "--grpc-port", "0", "--rest-port", "0", "--dicom-port", "0",
                 "--upstream", "127.0.0.1:9", "--allow-anonymous", "--audit-log", str(folder / "audit.jsonl"),
                 "--config", str(folder / "gateway.yaml"), "--results-to", "dicomweb+http://127.0.0.1:9/dicom-web",
                 "--model-repository", str(folder), "--pacs-config", str(folder / "pacs.yaml")], cwd=checkout, stdout=handle, stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MEDPIPE_DEID_KEY": BENCH_KEY,
                     "PYTHONPATH": str(checkout)})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            text = log.read_text()
            rest, dicom = LISTENING.search(text), DICOM_LINE.search(text)
            if rest and dicom:
                self.rest, self.dicom_port = rest["rest"], int(dicom["port"])
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {text[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError("the gateway did not start")

    def c_store(self, path: Path) -> int:
        sent = subprocess.run([sys.executable, "-c", SENDER, str(self.dicom_port), str(path)], capture_output=True,
                              text=True, timeout=900)
        if sent.returncode != 0:
            return -1  # association aborted
        return int(sent.stdout.strip())

    def stow(self, path: Path, folder: Path) -> int:
        boundary = uuid.uuid4().hex
        body = folder / "stow.body"
        with open(body, "wb") as out, open(path, "rb") as source:
            out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            while piece := source.read(2**20):
                out.write(piece)
            out.write(f"\r\n--{boundary}--\r\n".encode())
        url = urllib.parse.urlsplit(self.rest)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=900)
        with open(body, "rb") as handle:
            connection.request("POST", "/dicom-web/studies", body=handle, headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Content-Length": str(body.stat().st_size)})
            status = connection.getresponse().status
        body.unlink()
        return status

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def measure(checkout: Path, root: Path, inputs: dict[str, Path]) -> dict:
    cases = (("c_store_300mb_refused", "c_store", inputs["300"]), ("c_store_200mb_stored", "c_store", inputs["200"]),
             ("stow_200mb_stored", "stow", inputs["200"]))
    out = {}
    for name, door, path in cases:
        folder = Path(tempfile.mkdtemp(dir=root))
        gateway = Gateway(checkout, folder)
        try:
            gateway.c_store(inputs["warmup"])
            before = peak_rss_mb(gateway.process.pid)
            status = gateway.c_store(path) if door == "c_store" else gateway.stow(path, folder)
            out[name] = {"status": hex(status) if door == "c_store" and status >= 0 else status,
                         "rss_growth_mb": round(peak_rss_mb(gateway.process.pid) - before, 1),
                         "rss_after_start_mb": round(before, 1)}
        finally:
            gateway.stop()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-checkout", help="another checkout (e.g. a git worktree of an older revision)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_pacs_memory_") as tmp:
        root = Path(tmp)
        inputs = {"warmup": big_mr(root / "warmup.dcm", 0.5), "300": big_mr(root / "300.dcm", 300),
                  "200": big_mr(root / "200.dcm", 200)}
        figures = {"this_checkout": measure(ROOT, root, inputs)}
        if args.baseline_checkout:
            figures["baseline_checkout"] = measure(Path(args.baseline_checkout).resolve(), root, inputs)
    mine = figures["this_checkout"]
    targets = {"300 MB C-STORE refused without buffering": "A700 and peak RSS growth < 100 MB",
               "200 MB instances stored by both doors in bounded memory": "stored and peak RSS growth < 100 MB"}
    passed = {
        "300 MB C-STORE refused without buffering": mine["c_store_300mb_refused"]["status"] == "0xa700"
        and mine["c_store_300mb_refused"]["rss_growth_mb"] < 100,
        "200 MB instances stored by both doors in bounded memory": mine["c_store_200mb_stored"]["status"] == "0x0"
        and mine["stow_200mb_stored"]["status"] == 200
        and max(mine["c_store_200mb_stored"]["rss_growth_mb"], mine["stow_200mb_stored"]["rss_growth_mb"]) < 100,
    }
    command = "python benchmarks/bench_pacs_memory.py" + (" --baseline-checkout OLDER" if args.baseline_checkout else "")
    write_result("pacs_memory", command, figures, targets, passed)
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
