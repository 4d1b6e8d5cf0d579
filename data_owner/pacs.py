"""The hospital's PACS over DICOMweb (dicomweb-client): take a study's image series (QIDO-RS to find
it, WADO-RS to fetch it), and put the DICOM SEG back (STOW-RS) into the same study.

``python -m data_owner pacs --study UID`` segments one study; ``--watch`` polls the PACS for studies
that have no SEG of this model yet and segments each once (bounded by ``--max-studies``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blindseg.errors import UsageError

NOT_IMAGES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC", "OT"})
SEG_DESCRIPTION = "blindseg {model}"  # the SeriesDescription of the SEGs this data owner stores (write_seg)


def _tag(item: dict[str, Any], tag: str, default: Any = None) -> Any:
    v = item.get(tag, {}).get("Value")
    return v[0] if v else default


@dataclass(frozen=True)
class Series:
    uid: str
    modality: str
    description: str
    instances: int | None

    def __str__(self) -> str:
        n = f", {self.instances} instances" if self.instances is not None else ""
        return f"{self.uid}: {self.modality} '{self.description}'{n}"


class Pacs:
    """A DICOMweb root (Orthanc: ``http://host:8042/dicom-web``), with HTTP basic auth if given."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        session = None
        if user is not None:
            from dicomweb_client.session_utils import create_session_from_auth
            from requests.auth import HTTPBasicAuth

            session = create_session_from_auth(HTTPBasicAuth(user, password or ""))
        self.client = DICOMwebClient(url=self.url, session=session)

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as exc:  # requests / HTTP errors of many kinds
            raise UsageError(f"{what} at {self.url} failed: {exc}") from None

    def studies(self) -> list[str]:
        found = self._call("searching for studies in the PACS", self.client.search_for_studies)
        return [u for u in (_tag(s, "0020000D") for s in found) if u]

    def series(self, study: str) -> list[Series]:
        found = self._call(f"searching study {study} in the PACS", self.client.search_for_series, study,
                           fields=["SeriesDescription", "NumberOfSeriesRelatedInstances", "Modality"])
        return [Series(str(_tag(s, "0020000E")), str(_tag(s, "00080060", "")), str(_tag(s, "0008103E", "")),
                       _tag(s, "00201209")) for s in found]

    def image_series(self, study: str, series: str | None = None) -> Series:
        """The study's one image series (or ``series``); several without a choice are refused, listed."""
        all_ = self.series(study)
        if not all_:
            raise UsageError(f"study {study}: not in the PACS at {self.url}")
        if series is not None:
            pick = [s for s in all_ if s.uid == series]
            if not pick:
                raise UsageError(f"study {study} has no series {series}; it holds: {'; '.join(map(str, all_))}")
            return pick[0]
        images = [s for s in all_ if s.modality not in NOT_IMAGES]
        if len(images) != 1:
            raise UsageError(f"study {study} holds {len(images)} image series ({'; '.join(map(str, images))}); "
                             "choose one with --series <SeriesInstanceUID>" if images else
                             f"study {study} holds no image series")
        return images[0]

    def has_seg(self, study: str, model: str) -> bool:
        """A SEG of ``model`` stored by blindseg is already in the study."""
        want = SEG_DESCRIPTION.format(model=model)
        return any(s.modality == "SEG" and s.description == want for s in self.series(study))

    def fetch(self, study: str, series: Series, dest: Path) -> list[Path]:
        """The series' instances as files in ``dest``."""
        got = self._call(f"retrieving series {series.uid} from the PACS", self.client.retrieve_series, study, series.uid)
        files = []
        for i, ds in enumerate(got):
            f = dest / f"{i:05d}.dcm"
            ds.save_as(f)
            files.append(f)
        if not files:
            raise UsageError(f"series {series.uid} of study {study}: the PACS returned no instances")
        return files

    def store(self, path: Path) -> str:
        """STOW-RS the file; its SOP Instance UID."""
        import pydicom

        ds = pydicom.dcmread(str(path))
        self._call(f"storing {path.name} to the PACS", self.client.store_instances, datasets=[ds])
        return str(ds.SOPInstanceUID)
