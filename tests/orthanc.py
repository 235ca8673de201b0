"""A real PACS for tests: Debian's Orthanc (+ DICOMweb plugin) as a plain process on free ports.

    with OrthancServer(tmp_path) as pacs:   # or the `orthanc` fixture in tests/conftest.py
        pacs.http, pacs.dicomweb, pacs.dicom_port, pacs.aet

Skips (pytest.skip) when /usr/sbin/Orthanc or the plugin is absent (scripts/install_system_deps.sh installs them).
The process is killed at exit; `stop()` / `start()` let a test take the PACS down and bring it back on the same
ports and storage (the "destination down" acceptance test).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

ORTHANC = Path(os.environ.get("MEDPIPE_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_available() -> bool:
    return ORTHANC.is_file() and DICOMWEB_PLUGIN.is_file()


class OrthancServer:
    def __init__(self, folder: Path, aet: str = "TESTPACS", modalities: Optional[dict] = None,
                 stable_age: int = 2, extra: Optional[dict] = None):
        # Orthanc reads both ports from the configuration written before it starts (models.distributed.free_ports)
        from models.distributed import free_ports

        self.folder = Path(folder)
        self.aet = aet
        self.http_port, self.dicom_port = free_ports(2)
        self.modalities = modalities or {}
        self.stable_age = stable_age
        self.extra = extra or {}  # more configuration keys (e.g. the compose config's LuaScripts, UserMetadata)
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.folder / "orthanc.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.http}/dicom-web"

    def write_config(self) -> Path:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": self.aet, "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
            "StableAge": self.stable_age, "DicomModalities": self.modalities,
            "DicomCheckCalledAet": False, "UnknownSopClassAccepted": True, **self.extra,
        }
        path = self.folder / "config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 30.0) -> "OrthancServer":
        if not orthanc_available():
            pytest.skip(f"{ORTHANC} or {DICOMWEB_PLUGIN} is absent (scripts/install_system_deps.sh installs them)")
        config = self.write_config()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([str(ORTHANC), str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.folder)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http}/system", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- small REST/DICOMweb helpers for assertions
    def get_json(self, path: str, accept: str = "application/json"):
        request = urllib.request.Request(f"{self.http}{path}", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else []

    def qido(self, path: str):
        """QIDO-RS under /dicom-web (e.g. /studies/UID/instances); [] when nothing matches."""
        return self.get_json(f"/dicom-web{path}", accept="application/dicom+json")

    def upload(self, data: bytes) -> dict:
        request = urllib.request.Request(f"{self.http}/instances", data=data, method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
