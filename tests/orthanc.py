"""A private Orthanc (with its DICOMweb plugin) on a free loopback port, for tests; they skip with the
reason when Orthanc is not installed (``apt-get install orthanc orthanc-dicomweb``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from blindseg.broker import free_port, stop_process

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (("/usr/sbin/Orthanc") if Path("/usr/sbin/Orthanc").exists() else None)


def dicomweb_plugin() -> str | None:
    for d in PLUGIN_DIRS:
        for f in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []:
            return str(f)
    return None


class Orthanc:
    def __init__(self, workdir: Path) -> None:
        self.dir, self.port = workdir, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def __enter__(self) -> Orthanc:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = {"Name": "blindseg-test", "HttpPort": self.port, "DicomPort": free_port(), "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "StorageDirectory": str(self.dir / "db"),
               "IndexDirectory": str(self.dir / "db"), "Plugins": [dicomweb_plugin()],
               "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (self.dir / "orthanc.json").write_text(json.dumps(cfg))
        log = open(self.dir / "orthanc.log", "wb")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([str(orthanc_binary()), str(self.dir / "orthanc.json")], stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/system", timeout=1).read()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"Orthanc did not start; see {self.dir / 'orthanc.log'}") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
