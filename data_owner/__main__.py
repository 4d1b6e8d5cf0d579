"""``python -m data_owner segment --config data_owner.toml --model ID --input FILE|DIR|demo --out DIR``
and ``python -m data_owner pacs --config data_owner.toml --model ID --pacs URL --study UID|--watch --out DIR``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from blindseg.config import PartyConfig
from blindseg.errors import BlindsegError, UsageError
from blindseg.node import run_service

log = logging.getLogger("blindseg.data_owner")


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", required=True)
    s.add_argument("--model", required=True, help="model id deployed by the model owner")
    s.add_argument("--out", required=True, type=Path, help="output directory (mask, overlay, report.json)")
    s.add_argument("--series", default=None, help="SeriesInstanceUID, where the folder or study holds several")
    s.add_argument("--batch", type=_batch, default=None,
                   help="windows per secure job (default: as many as fit 512 MiB of dealer material per server, "
                        "at most 16; every job of a scan the same size)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--retries", type=int, default=1, help="retry a failed job this many times (fresh bundle)")
    s.add_argument("--overlap", type=float, default=0.25,
                   help="overlap of the windows over slices larger than the model input (0 <= overlap < 1)")
    s.add_argument("--keep-input", action="store_true",
                   help="also write input.npy, the scan as the model saw it (plaintext; off by default)")
    s.add_argument("--pacs-user", default=None)
    s.add_argument("--pacs-password-file", default=None)


def _batch(v: str) -> int | None:
    if v == "auto":
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes a number or 'auto', not {v!r}") from None


def _password(args: argparse.Namespace) -> str | None:
    if not args.pacs_password_file:
        return None
    try:
        return Path(args.pacs_password_file).read_text().strip()
    except OSError as e:
        raise UsageError(f"--pacs-password-file {args.pacs_password_file}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_owner")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("segment", help="segment a scan on the deployment")
    s.add_argument("--input", required=True,
                   help="NIfTI, NRRD, NPY or PNG file, a DICOM file or series directory, or 'demo' (a bundled "
                        "MNI152 test slice)")
    s.add_argument("--pacs", default=None,
                   help="DICOMweb root of the PACS (e.g. http://pacs:8042/dicom-web): store the DICOM SEG there")
    _common(s)
    p = sub.add_parser("pacs", help="segment a study from the PACS (DICOMweb) and store the DICOM SEG back")
    p.add_argument("--pacs", required=True, help="DICOMweb root of the PACS (e.g. http://pacs:8042/dicom-web)")
    p.add_argument("--study", default=None, help="StudyInstanceUID to segment")
    p.add_argument("--watch", action="store_true",
                   help="poll the PACS and segment every study without a SEG of this model")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between polls (--watch)")
    p.add_argument("--max-studies", type=int, default=None, help="stop after this many studies (--watch)")
    _common(p)
    args = ap.parse_args(argv)
    if args.cmd == "pacs" and (args.study is None) == (not args.watch):
        ap.error("pacs: give exactly one of --study UID and --watch")
    return run_service(_segment(args) if args.cmd == "segment" else _pacs(args))


def _options(args: argparse.Namespace) -> Any:
    from .pipeline import Options

    return Options(batch=args.batch, overlap=args.overlap, retries=args.retries, quiet=args.quiet,
                   keep_input=args.keep_input)


def _finish(report: dict[str, Any], out: Path) -> None:
    (out / "report.json.part").write_text(json.dumps(report, indent=1))
    (out / "report.json.part").replace(out / "report.json")
    print(json.dumps({k: v for k, v in report.items() if k != "layers"}), flush=True)


async def _segment(args: argparse.Namespace) -> None:
    from .client import Client
    from .io import read_image
    from .pipeline import segment_scan

    opts = _options(args)
    if args.input == "demo":
        from blindseg.models import demo_slices

        d = demo_slices()
        k = len(d["test_image"]) // 2
        raw, meta = d["test_image"][k:k + 1].astype(np.float32), dict[str, Any](kind="npy")
    else:
        raw, meta = read_image(args.input, args.series)
    if args.pacs and meta["kind"] != "dicom":
        raise UsageError("--pacs stores a DICOM SEG, which needs a DICOM input series")
    async with Client(PartyConfig.load(args.config, "data_owner")) as client:
        res = await segment_scan(client, args.model, raw, meta, args.out, opts)
    if args.pacs and res.seg is not None:
        from .pacs import Pacs

        uid = await asyncio.to_thread(Pacs(args.pacs, args.pacs_user, _password(args)).store, res.seg)
        res.report["pacs"] = {"url": args.pacs, "sop_instance_uid": uid}
    _finish(res.report, args.out)


async def _pacs(args: argparse.Namespace) -> None:
    """One study (``--study``), or every new study as it arrives (``--watch``); each into out/<study>."""
    from .client import Client
    from .pacs import Pacs

    opts = _options(args)
    pacs = Pacs(args.pacs, args.pacs_user, _password(args))
    async with Client(PartyConfig.load(args.config, "data_owner")) as client:
        if args.study is not None:
            _finish(await _study(client, pacs, args.study, args, opts), args.out)
            return
        done, failed = 0, set[str]()
        while args.max_studies is None or done < args.max_studies:
            todo = [u for u in await asyncio.to_thread(pacs.studies) if u not in failed]
            for study in todo:
                if args.max_studies is not None and done >= args.max_studies:
                    break
                if await asyncio.to_thread(pacs.has_seg, study, args.model):
                    continue
                try:
                    report = await _study(client, pacs, study, args, opts)
                except BlindsegError as e:  # one bad study must not stop the watch; it is not retried
                    log.error("study %s: %s", study, e)
                    failed.add(study)
                    continue
                _finish(report, args.out / study)
                done += 1
            else:
                await asyncio.sleep(args.interval)


async def _study(client: Any, pacs: Any, study: str, args: argparse.Namespace, opts: Any) -> dict[str, Any]:
    """Fetch the study's image series into a private temporary folder (removed afterwards), segment it,
    store the SEG back into the study."""
    from .io import read_dicom_series
    from .pipeline import segment_scan

    out = args.out / study if args.watch else args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    series = await asyncio.to_thread(pacs.image_series, study, args.series)
    with tempfile.TemporaryDirectory(prefix=".series-", dir=out) as tmp:  # 0700, gone after the SEG is written
        files = await asyncio.to_thread(pacs.fetch, study, series, Path(tmp))
        t_fetch = time.perf_counter() - t0
        raw, meta = await asyncio.to_thread(read_dicom_series, Path(tmp))
        res = await segment_scan(client, args.model, raw, meta, out, opts)
        if res.seg is None:
            raise UsageError(f"study {study}: the mask does not fit the {len(files)} fetched slices; no SEG")
        t1 = time.perf_counter()
        uid = await asyncio.to_thread(pacs.store, res.seg)
    res.report["pacs"] = {"url": pacs.url, "study": study, "series": series.uid, "instances": len(files),
                          "seg_sop_instance_uid": uid, "fetch_seconds": t_fetch,
                          "store_seconds": time.perf_counter() - t1, "round_trip_seconds": time.perf_counter() - t0}
    return res.report


sys.exit(main())
