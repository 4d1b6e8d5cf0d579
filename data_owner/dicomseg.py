"""The mask as a DICOM Segmentation (highdicom), referencing the source series, so the result goes
back into the hospital's PACS next to the scan it was made from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blindseg.errors import UsageError


def write_seg(path: str | Path, mask: np.ndarray, files: list[str], class_names: list[str],
              model: str = "blindseg", version: str = "1") -> Path:
    """``mask``: N x rows x cols labels in the order of ``files`` (the series' slices, as read).
    Class 0 is background; every other class present becomes one segment; the SEG series is described
    as ``model`` (how the PACS watcher recognises studies already done). Written atomically."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in files]
    if len(sources) != mask.shape[0] or any((s.Rows, s.Columns) != mask.shape[1:] for s in sources):
        raise UsageError(f"the mask ({mask.shape}) does not match the {len(sources)} source slices")
    labels = [k for k in range(1, len(class_names)) if np.any(mask == k)] or [1]
    algo = hd.AlgorithmIdentificationSequence(name=model, version=version,
                                              family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=class_names[k][:64] if k < len(class_names) else f"class {k}",
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        for i, k in enumerate(labels)]
    relabel = np.zeros(int(mask.max()) + 1 if mask.size else 1, dtype=np.uint8)
    for i, k in enumerate(labels):
        if k < relabel.size:
            relabel[k] = i + 1
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=relabel[mask], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="blindseg",
        manufacturer_model_name=model, software_versions=version, device_serial_number="blindseg",
        series_description=model[:64])
    p = Path(path)
    tmp = p.with_name(p.name + ".part")
    seg.save_as(tmp)
    tmp.replace(p)
    return p


def read_seg_labels(path: str | Path, files: list[str]) -> dict[str, Any]:
    """What a PACS would see: the referenced source instances and the label map per source slice."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(path))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    return {"labels": np.asarray(labels), "segments": [d.SegmentLabel for d in seg.SegmentSequence],
            "referenced": uids}


def store_to_pacs(url: str, path: str | Path, username: str | None = None, password: str | None = None) -> str:
    """STOW-RS the file at ``path`` to a DICOMweb server (``url`` is its DICOMweb root, e.g.
    ``http://pacs:8042/dicom-web`` for Orthanc); returns the stored SOP Instance UID."""
    from .pacs import Pacs

    return Pacs(url, username, password).store(Path(path))
