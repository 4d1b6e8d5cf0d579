"""Real data in, real masks out: MNI152 loader, NIfTI/DICOM/PNG/NPY I/O, bad input, secure vs plaintext on real slices."""

from __future__ import annotations

import numpy as np
import pytest

from blindseg.errors import UsageError
from data_owner.io import read_dicom_series, read_image, write_mask, write_overlay

from .deployed import assert_faithful

# ------------------------------------------------------------------ DICOM helpers


def _dicom_slice(path, z, pixels, slope=2.0, intercept=-1024.0, series="1.2.3", rows=None, with_pixels=True,
                 study="1.2.3.4"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, study + ".5"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P1", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", \
        "1", "A1", ""
    ds.SeriesNumber, ds.SliceThickness = 1, 2.5
    ds.Modality = "CT"
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.InstanceNumber = 1
    px = pixels.astype(np.uint16)
    ds.Rows, ds.Columns = rows or px.shape[0], px.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if with_pixels:
        ds.PixelData = px.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series(d, zs=(0, 2.5, 5, 7.5, 10), **kw):
    d.mkdir(exist_ok=True)
    order = [3, 0, 4, 1, 2][: len(zs)]  # file names not in slice order
    for k, z in enumerate(zs):
        _dicom_slice(d / f"im{order[k]:03d}.dcm", z, np.full((8, 6), 100 * k + 7), **kw)
    return d


def test_dicom_series_is_sorted_by_position_with_hu_rescale(tmp_path):
    arr, meta = read_dicom_series(_series(tmp_path / "ct"))
    assert arr.shape == (5, 1, 8, 6) and arr.dtype == np.float32
    assert np.allclose(arr[:, 0, 0, 0], [2.0 * (100 * k + 7) - 1024 for k in range(5)])  # slope, intercept, order
    # array axes (row, column, slice) -> RAS: rows run along -y, columns along -x (LPS flipped), slices along z
    assert meta["affine"][2, 2] == pytest.approx(2.5) and meta["affine"][1, 0] == meta["affine"][0, 1] == pytest.approx(-0.5)


def test_dicom_errors_name_the_file_and_problem(tmp_path):
    d = _series(tmp_path / "mixed")
    _dicom_slice(d / "other.dcm", 12.5, np.zeros((8, 6)), series="9.9.9")
    # two series in one folder: refused with both listed, until one is chosen by its SeriesInstanceUID
    with pytest.raises(UsageError, match=r"holds 2 series \(1\.2\.3: CT '', 5 files; 9\.9\.9: CT '', 1 files\); choose"):
        read_dicom_series(d)
    arr, meta = read_dicom_series(d, series="1.2.3")
    assert arr.shape[0] == 5 and meta["series"] == "1.2.3"
    arr, meta = read_image(d / "other.dcm", series="9.9.9")
    assert arr.shape[0] == 1
    with pytest.raises(UsageError, match="no series 7.7; it holds 1.2.3"):
        read_dicom_series(d, series="7.7")
    d = _series(tmp_path / "nopix")  # an image-less DICOM beside the series (a DICOMDIR, a report) is skipped
    _dicom_slice(d / "empty.dcm", 12.5, np.zeros((8, 6)), with_pixels=False)
    arr, meta = read_dicom_series(d)
    assert arr.shape[0] == 5 and meta["skipped"] == ["empty.dcm"]
    d = _series(tmp_path / "geom", zs=(0, 2.5, 5, 9, 10))
    with pytest.raises(UsageError, match="not evenly spaced"):
        read_dicom_series(d)
    d = _series(tmp_path / "rows")
    _dicom_slice(d / "big.dcm", 12.5, np.zeros((10, 6)))
    with pytest.raises(UsageError, match="big.dcm: 10x6 pixels"):
        read_dicom_series(d)
    d = _series(tmp_path / "junk")  # a LICENSE shipped in the series folder no longer aborts it
    (d / "LICENSE").write_text("not dicom")
    arr, meta = read_dicom_series(d)
    assert arr.shape[0] == 5 and meta["skipped"] == ["LICENSE"]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "README").write_text("x")
    with pytest.raises(UsageError, match="no DICOM image files .skipped: README"):
        read_dicom_series(tmp_path / "none")


def test_single_dicom_file_and_pixel_padding(tmp_path):
    """One .dcm file is a one-slice scan; PixelPaddingValue voxels (-3024 HU outside the field of view)
    never enter the model: they take the lowest real value and are reported, their label background."""
    from pydicom import dcmread

    px = np.full((8, 6), 1000)
    px[:, :2] = 0  # stored 0, the padding value: -1024 HU after rescale, but outside the field of view
    _dicom_slice(tmp_path / "one.dcm", 0.0, px)
    ds = dcmread(tmp_path / "one.dcm")
    ds.add_new(0x00280120, "US", 0)  # PixelPaddingValue (VR follows PixelRepresentation = unsigned)
    ds.save_as(tmp_path / "one.dcm")
    arr, meta = read_image(tmp_path / "one.dcm")
    assert arr.shape == (1, 1, 8, 6)
    assert meta["padding_mask"].sum() == 16 and np.all(arr[0, 0, :, :2] == 2.0 * 1000 - 1024)


def test_windows_cover_every_voxel_and_stitch_back(tmp_path):
    """A slice larger than the model input is covered by overlapping windows (nothing cropped); one
    smaller is padded with its own minimum; stitching takes each voxel from its nearest window centre."""
    from data_owner.windows import cut, plan_windows, stitch

    rng = np.random.default_rng(0)
    for image, size in (((300, 200), (128, 128)), ((100, 90), (128, 128)), ((512, 512), (128, 128)),
                        ((128, 300), (128, 128))):
        raw = rng.normal(size=(2, 1, *image)).astype(np.float32)
        w = plan_windows(image, size, 0.25, align=16)
        tiles = cut(raw, w)
        assert tiles.shape == (2 * w.count, 1, *size)
        # an "identity model": each window's label is the voxel's own row * cols + col, offset by the window
        ids = np.arange(image[0] * image[1]).reshape(image)
        big = np.full((max(size[0], image[0]), max(size[1], image[1])), -1)
        big[w.pad[0]:w.pad[0] + image[0], w.pad[1]:w.pad[1] + image[1]] = ids
        per = [big[y:y + size[0], x:x + size[1]] for y in w.starts[0] for x in w.starts[1]]
        masks = np.stack([np.stack(per)] * 2).reshape(2 * w.count, *size)
        back = stitch(masks, w)
        assert back.shape == (2, *image) and np.array_equal(back[0], ids) and np.array_equal(back[1], ids)
        assert all(s % 16 == 0 or s == image[a] - size[a] for a in (0, 1) for s in w.starts[a])
        if image[0] < size[0]:
            assert w.pad[0] > 0 and float(tiles[0, 0, 0, 0]) == float(raw[0].min())  # padded with the minimum


def test_nifti_mask_keeps_the_affine_and_npy_png_round_trip(tmp_path):
    import nibabel as nib

    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
    vol = np.random.default_rng(0).normal(size=(10, 12, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "scan.nii.gz")
    arr, meta = read_image(tmp_path / "scan.nii.gz")
    assert arr.shape == (3, 1, 10, 12) and np.allclose(arr[1, 0], vol[:, :, 1])
    mask = (arr[:, 0] > 0).astype(np.int64)
    out = write_mask(tmp_path / "mask.nii.gz", mask, meta)
    back = nib.load(out)
    assert np.allclose(back.affine, affine) and np.array_equal(np.asarray(back.dataobj), np.moveaxis(mask, 0, 2))
    np.save(tmp_path / "img.npy", vol[:, :, 0])
    a2, _ = read_image(tmp_path / "img.npy")
    assert a2.shape == (1, 1, 10, 12)
    write_mask(tmp_path / "m.npy", mask)
    assert np.array_equal(np.load(tmp_path / "m.npy"), mask)
    png = write_overlay(tmp_path / "overlay.png", arr[0, 0], mask[0], ["bg", "fg"])
    assert png.stat().st_size > 1000 and not list(tmp_path.glob("*.part*"))


def test_bad_input_files(tmp_path):
    (tmp_path / "fake.png").write_text("this is not a png")
    with pytest.raises(UsageError, match="fake.png: cannot be read as an image"):
        read_image(tmp_path / "fake.png")
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(UsageError, match="unsupported file type"):
        read_image(tmp_path / "x.docx")
    np.save(tmp_path / "empty.npy", np.zeros((0, 128, 128), dtype=np.float32))
    with pytest.raises(UsageError, match="empty.npy: the image is empty"):
        read_image(tmp_path / "empty.npy")
    with pytest.raises(UsageError, match="no such file"):
        read_image(tmp_path / "missing.nii")


def test_mni_loader_classes_shapes_and_split():
    pytest.importorskip("nilearn", reason="the MNI152 template comes from the nilearn wheel (dev extra)")
    from blindseg.mni import CLASSES, load_split

    tr, te = load_split(gap=3)
    assert tr.image.shape[1:] == (1, 128, 128) and te.label.shape[1:] == (128, 128)
    assert set(np.unique(tr.label)) == set(range(len(CLASSES)))
    assert not set(tr.z) & set(te.z)
    assert min(abs(a - b) for a in tr.z for b in te.z) > 3  # a gap of 3 unused slices
    assert np.all(np.diff(te.z) == 1)  # one contiguous slab
    assert np.all(tr.image[tr.label[:, None] > 0] > 0)  # every brain-class pixel has T1 signal (skull-stripped)
    assert 0.05 < (te.label == 2).mean() < 0.5 and 0.05 < (te.label == 3).mean() < 0.5


@pytest.mark.slow
def test_secure_matches_plaintext_on_real_test_slices():
    import torch

    from blindseg import intensity
    from blindseg.compiler import compile_model
    from blindseg.engine import run_compiled
    from blindseg.models import demo_slices, load_named_model

    model, calib, meta = load_named_model("mni-unet")
    d = demo_slices()
    x = intensity.apply(meta["preprocess"], d["test_image"][::3].astype(np.float32))  # 5 slices across the slab
    comp = compile_model(model, (1, 128, 128), "mask", "auto", samples=calib)
    import asyncio

    res = asyncio.run(run_compiled(comp, x))
    with torch.no_grad():
        plain = torch.argmax(model(torch.from_numpy(x)), 1).numpy()
    assert (res.mask == plain).mean() >= 0.9995


def test_layer_rows_take_the_larger_server_and_sum_over_jobs():
    from blindseg.plan import Plan
    from blindseg.report import layer_rows, sum_layers

    plan = Plan.from_dict(_small_plan_dict())
    rows = layer_rows(plan, [{1: (0.5, 100, 1)}, {1: (0.7, 90, 1)}], {2: 40})
    assert [(r["op"], r["online_seconds"], r["online_bytes"], r["rounds"], r["offline_bytes"]) for r in rows] == [
        (1, 0.7, 100, 1, 0), (2, 0.0, 0, 0, 40)]
    assert sum_layers([rows]) == rows
    twice = sum_layers([rows, rows])
    assert twice[0]["online_bytes"] == 200 and twice[0]["rounds"] == 2 and twice[1]["offline_bytes"] == 80


def _small_plan_dict():
    from blindseg.compiler import compile_model
    from blindseg.models import build_model

    x = np.random.default_rng(0).normal(size=(1, 1, 16, 16))
    return compile_model(build_model("ref-unet", seed=0), (1, 16, 16), "mask", "auto", samples=x).plan.to_dict()


async def test_segment_cli_covers_every_voxel_of_a_large_slice(tmp_path):
    """`python -m data_owner segment` on slices larger than the model input (and one smaller): windows
    cover the whole slice, the mask has the scan's own size and equals the plaintext model run on the same
    windows and stitched; the report states the windows; no plaintext copy of the scan is written."""
    import asyncio
    import json

    import torch

    from blindseg.broker import EmbeddedBroker
    from blindseg.config import PartyConfig
    from blindseg.demo import LocalDeployment
    from blindseg.models import load_named_model
    from blindseg.plan import downsampling
    from data_owner.windows import cut, plan_windows, stitch
    from model_owner.client import deploy

    model, _, _ = load_named_model("ref-unet", 32)
    rng = np.random.default_rng(1)
    from blindseg.models import test_image

    big = test_image(2, 96, seed=3)[:, :, :, :80].astype(np.float32)  # 96 x 80 slices, a 32 x 32 model
    big += 0.02 * rng.normal(size=big.shape).astype(np.float32)
    np.save(tmp_path / "scan.npy", big[:, 0])
    broker = await EmbeddedBroker().start()
    dep = LocalDeployment(tmp_path / "dep", broker.url, pool=2)
    try:
        await asyncio.to_thread(dep.start)
        info = await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=32, timeout=120)
        assert info["epoch"]
        out = tmp_path / "out"
        report = await dep.client("data_owner", "segment", "--model", "m", "--input", str(tmp_path / "scan.npy"),
                                  "--out", str(out), "--quiet", "--batch", "16", timeout=300)
        mask = np.load(out / "mask.npy")
        assert mask.shape == (2, 96, 80) and report["windows_per_slice"] >= 3 * 3
        assert report["voxels_segmented"] == 2 * 96 * 80
        assert not (out / "input.npy").exists()
        full = json.loads((out / "report.json").read_text())
        assert full["window"] == [32, 32] and full["image"] == [96, 80]
        from blindseg.plan import Plan

        plan = Plan.from_dict(json.loads(next((dep.root / "state" / "server0" / "models").glob("m@*.plan.json"))
                                         .read_text()))
        w = plan_windows((96, 80), (32, 32), 0.25, downsampling(plan.ops))
        assert w.count == report["windows_per_slice"]
        # a DICOM series (smaller than the model input: padded) also comes back as a DICOM SEG
        series = _series(tmp_path / "ct", slope=0.01, intercept=0.0)  # in the model's calibrated range
        await dep.client("data_owner", "segment", "--model", "m", "--input", str(series), "--out",
                         str(tmp_path / "dcm"), "--quiet", timeout=300)
        import nibabel as nib

        from data_owner.dicomseg import read_seg_labels

        files = read_dicom_series(series)[1]["files"]  # in slice order
        nifti = np.moveaxis(np.asarray(nib.load(tmp_path / "dcm" / "mask.nii.gz").dataobj), 2, 0)
        back = read_seg_labels(tmp_path / "dcm" / "mask.seg.dcm", files)
        labels = back["labels"][..., 0] if back["labels"].ndim == 4 else back["labels"]
        assert labels.shape == nifti.shape == (5, 8, 6)
        if nifti.any():  # segment 1 = the foreground class
            np.testing.assert_array_equal(labels, nifti)
        with torch.no_grad():
            logits = model(torch.from_numpy(cut(big, w))).numpy()
        assert_faithful(mask, np.stack([stitch(logits[:, c], w) for c in range(logits.shape[1])], 1))
    finally:
        dep.stop()
        await broker.stop()


def test_scans_are_brought_to_the_model_geometry_and_masks_mapped_back(tmp_path):
    """The same anatomy stored in RAS at 2 mm, in LPS (flipped axes), transposed, and at 1 mm gives the
    same mask on its own grid (exact without resampling, up to resampling otherwise)."""
    import nibabel as nib

    from data_owner.geometry import to_model_geometry

    rng = np.random.default_rng(0)
    truth = np.zeros((20, 24, 10))
    truth[4:15, 6:20, 2:8] = 1.0
    truth += 0.05 * rng.normal(size=truth.shape)
    geom = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "rot90": 1}

    def seg(img):  # a per-voxel "model" on the model-geometry slices, mapped back
        slices, back, info = to_model_geometry(img, geom)
        return back((slices[:, 0] > 0.5).astype(np.int64)), slices, info

    ras = nib.Nifti1Image(truth.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    m_ras, slices, info = seg(ras)
    assert np.array_equal(m_ras, truth > 0.5)
    assert np.array_equal(slices[3, 0], np.rot90(truth[:, :, 3]).astype(np.float32))  # as the model was trained
    # LPS: x and y flipped in storage, the affine says so
    lps_data = truth[::-1, ::-1, :]
    lps = nib.Nifti1Image(lps_data.astype(np.float32), np.diag([-2.0, -2.0, 2.0, 1.0]))
    m_lps, slices_lps, info = seg(lps)
    assert info["orientation"] == "LPS" and np.array_equal(slices_lps, slices)
    assert np.array_equal(m_lps, lps_data > 0.5)  # on the scan's own grid
    # axes stored in another order (z, x, y)
    perm = nib.Nifti1Image(np.transpose(truth, (2, 0, 1)).astype(np.float32),
                           np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]]))
    m_perm, slices_perm, _ = seg(perm)
    assert np.array_equal(slices_perm, slices) and np.array_equal(m_perm, np.transpose(truth > 0.5, (2, 0, 1)))
    # 1 mm: resampled to the model's 2 mm and back
    fine = np.repeat(np.repeat(np.repeat(truth, 2, 0), 2, 1), 2, 2)
    m_fine, slices_fine, info = seg(nib.Nifti1Image(fine.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0])))
    assert info["resampled_shape"] == [20, 24, 10] and m_fine.shape == fine.shape
    assert (m_fine == (fine > 0.5)).mean() > 0.97


async def test_segment_cli_gives_the_same_mask_in_any_orientation(tmp_path):
    """The bundled brain model (trained on RAS axial slices at 2 mm after a rot90) on an MNI slab stored
    in RAS and in LPS: both masks, each on its own scan's grid, are the same anatomy, and they match
    the plaintext model on the model-geometry slices."""
    import asyncio

    import nibabel as nib
    import torch

    from blindseg import intensity
    from blindseg.broker import EmbeddedBroker
    from blindseg.config import PartyConfig
    from blindseg.demo import LocalDeployment
    from blindseg.mni import volume
    from blindseg.models import MNI_PREPROCESS, load_named_model
    from model_owner.client import deploy

    t1, _ = volume()
    slab = t1[:, :, 40:43].astype(np.float32)
    nib.save(nib.Nifti1Image(slab, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "ras.nii.gz")
    nib.save(nib.Nifti1Image(slab[::-1, ::-1].copy(), np.diag([-2.0, -2.0, 2.0, 1.0])), tmp_path / "lps.nii.gz")
    model, _, _ = load_named_model("mni-unet")
    broker = await EmbeddedBroker().start()
    dep = LocalDeployment(tmp_path / "dep", broker.url, pool=1)
    try:
        await asyncio.to_thread(dep.start)
        await deploy(PartyConfig.load(dep.configs["model_owner"]), "mni-unet", "brain", timeout=120)
        masks = {}
        for name in ("ras", "lps"):
            rep = await dep.client("data_owner", "segment", "--model", "brain", "--input",
                                   str(tmp_path / f"{name}.nii.gz"), "--out", str(tmp_path / name), "--quiet",
                                   timeout=300)
            assert rep["geometry"]["orientation"] == name.upper()
            img = nib.load(tmp_path / name / "mask.nii.gz")
            masks[name] = np.asarray(img.dataobj)
            assert masks[name].shape == slab.shape and np.allclose(img.affine, nib.load(tmp_path / f"{name}.nii.gz").affine)
        assert (masks["ras"] == masks["lps"][::-1, ::-1]).mean() >= 0.999  # same anatomy, either storage
        x = np.stack([np.rot90(slab[:, :, k]) for k in range(3)])[:, None]
        from data_owner.windows import cut, plan_windows, stitch

        w = plan_windows(x.shape[2:], (128, 128), 0.25, 16)
        with torch.no_grad():
            want = stitch(torch.argmax(model(torch.from_numpy(intensity.apply(MNI_PREPROCESS, cut(x, w)).astype(
                np.float32))), 1).numpy(), w)
        want_vol = np.stack([np.rot90(want[k], -1) for k in range(3)], axis=2)
        assert (masks["ras"] == want_vol).mean() >= 0.999
    finally:
        dep.stop()
        await broker.stop()


def test_dicom_series_reaches_the_model_geometry_like_the_same_volume_in_nifti(tmp_path):
    """DICOM (LPS, rows/columns) -> RAS once, correctly: a series made from a RAS volume yields exactly
    the model-geometry slices of that volume."""
    from pydicom import dcmread

    from data_owner.geometry import as_image, to_model_geometry

    nx, ny, nz = 6, 8, 4
    truth = np.arange(nx * ny * nz).reshape(nx, ny, nz) % 97 * 10
    d = tmp_path / "series"
    d.mkdir()
    for z in range(nz):
        pixel = truth[::-1, ::-1, z].T  # row r, column c <- RAS voxel (nx-1-c, ny-1-r)
        _dicom_slice(d / f"s{z}.dcm", 2.0 * z, pixel, slope=1.0, intercept=0.0)
        ds = dcmread(d / f"s{z}.dcm")
        ds.ImagePositionPatient = [-2.0 * (nx - 1), -2.0 * (ny - 1), 2.0 * z]  # LPS of pixel (0, 0)
        ds.PixelSpacing = [2.0, 2.0]
        ds.save_as(d / f"s{z}.dcm")
    arr, meta = read_dicom_series(d)
    slices, back, info = to_model_geometry(as_image(arr, meta["affine"]),
                                           {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "rot90": 1})
    assert info["orientation"] != "RAS"  # stored otherwise, brought to RAS here
    for z in range(nz):
        np.testing.assert_array_equal(slices[z, 0], np.rot90(truth[:, :, z]).astype(np.float32))
    m = back(np.stack([np.rot90(truth[:, :, z]) for z in range(nz)]))
    np.testing.assert_array_equal(np.moveaxis(m, 2, 0), arr[:, 0])  # back on the series' own grid


def test_mask_goes_back_as_dicom_seg_referencing_the_series(tmp_path):
    """The result as a DICOM Segmentation (highdicom) referencing every source slice; read back, it is
    the mask, segment per class present, named after the plan's classes."""
    pytest.importorskip("highdicom")
    from data_owner.dicomseg import read_seg_labels, write_seg

    arr, meta = read_dicom_series(_series(tmp_path / "ct"))
    mask = np.zeros((5, 8, 6), dtype=np.int64)
    mask[1:4, 2:6, 1:4] = 1
    mask[2, 3:5, 2:3] = 3  # class 2 absent: no empty segment for it
    out = write_seg(tmp_path / "mask.seg.dcm", mask, meta["files"], ["background", "liver", "spleen", "tumour"])
    back = read_seg_labels(out, meta["files"])
    assert back["segments"] == ["liver", "tumour"]
    want = np.where(mask == 3, 2, mask)  # segment numbers 1 (liver), 2 (tumour)
    np.testing.assert_array_equal(back["labels"][..., 0] if back["labels"].ndim == 4 else back["labels"], want)


@pytest.mark.skipif(__import__("tests.orthanc", fromlist=["x"]).orthanc_binary() is None
                    or __import__("tests.orthanc", fromlist=["x"]).dicomweb_plugin() is None,
                    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
def test_dicom_seg_is_stored_in_a_real_pacs_and_references_the_series(tmp_path):
    """The source series and the SEG go to a real Orthanc over DICOMweb (STOW-RS); read back from it
    (QIDO-RS / WADO-RS), the SEG sits in the series' study and decodes to the mask."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from data_owner.dicomseg import read_seg_labels, store_to_pacs, write_seg

    from .orthanc import Orthanc

    series = _series(tmp_path / "ct")
    arr, meta = read_dicom_series(series)
    mask = np.zeros((5, 8, 6), dtype=np.int64)
    mask[1:4, 2:6, 1:4] = 1
    with Orthanc(tmp_path / "orthanc") as pacs:
        client = DICOMwebClient(url=pacs.dicomweb)
        client.store_instances(datasets=[pydicom.dcmread(f) for f in meta["files"]])
        seg = write_seg(tmp_path / "mask.seg.dcm", mask, meta["files"], ["background", "organ"])
        uid = store_to_pacs(pacs.dicomweb, seg)
        found = client.search_for_instances(search_filters={"Modality": "SEG"})
        assert [f["00080018"]["Value"][0] for f in found] == [uid]
        study = found[0]["0020000D"]["Value"][0]
        assert study == pydicom.dcmread(meta["files"][0]).StudyInstanceUID  # beside the scan it was made from
        got = client.retrieve_instance(study, found[0]["0020000E"]["Value"][0], uid)
        got.save_as(tmp_path / "from_pacs.dcm")
        back = read_seg_labels(tmp_path / "from_pacs.dcm", meta["files"])
        labels = back["labels"][..., 0] if back["labels"].ndim == 4 else back["labels"]
        np.testing.assert_array_equal(labels, mask)
    with pytest.raises(UsageError, match="storing mask.seg.dcm to the PACS"):
        store_to_pacs(f"http://127.0.0.1:{pacs.port}/dicom-web", seg)  # the PACS is gone: a clear error


def test_nrrd_is_read_in_its_space_and_the_mask_written_back_beside_it(tmp_path):
    """An NRRD in LPS space with its directions and origin reaches the model's geometry exactly as the
    same volume stored as RAS NIfTI; the mask goes back as NRRD with the input's space header."""
    import nibabel as nib
    import nrrd

    from data_owner.geometry import to_model_geometry
    from data_owner.io import write_nrrd_mask

    rng = np.random.default_rng(2)
    ras = rng.normal(size=(12, 10, 6)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [-11.0, -9.0, 4.0]
    nib.save(nib.Nifti1Image(ras, aff), tmp_path / "v.nii.gz")
    # the same anatomy in LPS storage: x and y reversed; directions and origin in LPS coordinates
    lps = ras[::-1, ::-1, :]
    far = aff @ np.array([11, 9, 0, 1.0])  # RAS position of voxel (11, 9, 0) = LPS storage's voxel 0
    header = {"space": "left-posterior-superior", "space directions": np.diag([2.0, 2.0, 3.0]),
              "space origin": np.array([-far[0], -far[1], far[2]])}
    nrrd.write(str(tmp_path / "v.nrrd"), np.ascontiguousarray(lps), header)
    a_nii, m_nii = read_image(tmp_path / "v.nii.gz")
    a_nrrd, m_nrrd = read_image(tmp_path / "v.nrrd")
    assert m_nrrd["kind"] == "nrrd" and a_nrrd.shape == (6, 1, 12, 10)
    assert np.allclose(m_nrrd["affine"] @ np.array([0, 0, 0, 1.0]), far)  # voxel 0 sits where it should in RAS
    geom = {"orientation": "RAS", "spacing": [2.0, 2.0, 3.0], "rot90": 1}
    s_nii, _, _ = to_model_geometry(m_nii["image"], geom)
    s_nrrd, back, _ = to_model_geometry(m_nrrd["image"], geom)
    np.testing.assert_array_equal(s_nrrd, s_nii)
    mask = (s_nrrd[:, 0] > 0).astype(np.int64)
    on_grid = np.ascontiguousarray(np.moveaxis(back(mask), 2, 0))
    out = write_nrrd_mask(tmp_path / "mask.nrrd", on_grid, m_nrrd)
    data, h = nrrd.read(str(out))
    assert h["space"] == "left-posterior-superior" and np.allclose(h["space origin"], header["space origin"])
    np.testing.assert_array_equal(data, lps > 0)  # the mask on the NRRD's own grid
    nrrd.write(str(tmp_path / "bad.nrrd"), np.zeros((2, 2, 2, 3), np.float32))  # e.g. a time series
    with pytest.raises(UsageError, match="bad.nrrd: expected a 2D or 3D NRRD volume, got 4 dimensions"):
        read_image(tmp_path / "bad.nrrd")
    (tmp_path / "junk.nrrd").write_text("not an nrrd")
    with pytest.raises(UsageError, match="junk.nrrd: cannot be read as NRRD"):
        read_image(tmp_path / "junk.nrrd")


def test_overlay_shows_three_planes_through_the_labels_in_any_storage_order(tmp_path):
    """The montage of a volume shows the same axial, coronal and sagittal planes (through the
    label-weighted centre) whether the scan is stored RAS or LPS; a CT window comes from the plan."""
    from data_owner.io import _three_planes
    from data_owner.pipeline import display_window

    rng = np.random.default_rng(3)
    vol = rng.normal(size=(16, 14, 12))  # x, y, z (RAS)
    lab = np.zeros(vol.shape, dtype=np.int64)
    lab[9:12, 3:6, 6:9] = 1  # centre (10, 4, 7)
    ras = _three_planes(np.moveaxis(vol, 2, 0), np.moveaxis(lab, 2, 0), np.diag([1.0, 1.0, 2.5, 1.0]))
    lps = _three_planes(np.moveaxis(vol[::-1, ::-1], 2, 0), np.moveaxis(lab[::-1, ::-1], 2, 0),
                        np.diag([-1.0, -1.0, 2.5, 1.0]))
    assert [p[3] for p in ras] == ["axial 8/12", "coronal 5/14", "sagittal 11/16"]  # through the labels
    for a, b in zip(ras, lps, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[1].any()
    assert ras[1][2] == pytest.approx(2.5)  # coronal: 2.5 mm rows, 1 mm columns
    png = write_overlay(tmp_path / "o.png", np.moveaxis(vol, 2, 0), np.moveaxis(lab, 2, 0), ["bg", "x"],
                        "t", (-1.0, 1.0), np.diag([1.0, 1.0, 2.5, 1.0]))
    assert png.stat().st_size > 1000

    class P:
        meta = {"preprocess": {"kind": "ct-window", "center": 40, "width": 400}}

    assert display_window(P(), vol) == (-160.0, 240.0)  # type: ignore[arg-type]


def _ct_study(d, study, series, vol, slope=0.01, intercept=-5.0):
    """A CT series from N x H x W values (scanner units = pixels x slope + intercept)."""
    d.mkdir(parents=True, exist_ok=True)
    for k in range(len(vol)):
        _dicom_slice(d / f"{series}-{k:03d}.dcm", 2.5 * k, np.rint((vol[k] - intercept) / slope), slope=slope,
                     intercept=intercept, series=series, study=study)
    return d


@pytest.mark.skipif(__import__("tests.orthanc", fromlist=["x"]).orthanc_binary() is None
                    or __import__("tests.orthanc", fromlist=["x"]).dicomweb_plugin() is None,
                    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
@pytest.mark.asyncio
async def test_pacs_round_trip_through_the_real_service(tmp_path):
    """A CT study in a real Orthanc is taken by StudyInstanceUID over DICOMweb, segmented through the
    running service, and its DICOM SEG stored back into the same study: the SEG in Orthanc references
    the series and decodes to the mask, which matches the plaintext model. ``--watch`` then segments
    only the new study; a study with two image series is refused, naming both."""
    import asyncio

    import nibabel as nib
    import pydicom
    import torch
    from dicomweb_client.api import DICOMwebClient

    from blindseg.broker import EmbeddedBroker
    from blindseg.config import PartyConfig
    from blindseg.demo import LocalDeployment
    from blindseg.errors import BlindsegError
    from blindseg.models import load_named_model, test_image
    from data_owner.dicomseg import read_seg_labels
    from data_owner.windows import cut, plan_windows, stitch
    from model_owner.client import deploy

    from .orthanc import Orthanc

    model, _, _ = load_named_model("ref-unet", 32)
    vol = test_image(4, 40, seed=5)[:, 0]  # 4 slices of 40 x 40: windows over a slice larger than the model
    a = _ct_study(tmp_path / "a", "1.2.826.1.1", "1.2.826.1.1.1", vol)
    b = _ct_study(tmp_path / "b", "1.2.826.1.2", "1.2.826.1.2.1", vol[::-1].copy())
    two = _ct_study(tmp_path / "c", "1.2.826.1.3", "1.2.826.1.3.1", vol[:2])
    _ct_study(two, "1.2.826.1.3", "1.2.826.1.3.2", vol[2:])
    broker = await EmbeddedBroker().start()
    dep = LocalDeployment(tmp_path / "dep", broker.url, pool=2)
    with Orthanc(tmp_path / "orthanc") as pacs:
        try:
            web = DICOMwebClient(url=pacs.dicomweb)
            web.store_instances(datasets=[pydicom.dcmread(f) for f in sorted(a.iterdir())])
            web.store_instances(datasets=[pydicom.dcmread(f) for f in sorted(two.iterdir())])
            await asyncio.to_thread(dep.start)
            await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=32, timeout=120)
            rep = await dep.client("data_owner", "pacs", "--model", "m", "--pacs", pacs.dicomweb, "--study",
                                   "1.2.826.1.1", "--out", str(tmp_path / "out"), "--quiet", timeout=300)
            assert rep["pacs"]["instances"] == 4 and rep["voxels_segmented"] == 4 * 40 * 40
            assert not list((tmp_path / "out").glob(".series-*"))  # the fetched copy is gone
            segs = web.search_for_series("1.2.826.1.1", search_filters={"Modality": "SEG"})
            assert len(segs) == 1  # in the same study
            seg = web.retrieve_instance("1.2.826.1.1", segs[0]["0020000E"]["Value"][0],
                                        rep["pacs"]["seg_sop_instance_uid"])
            seg.save_as(tmp_path / "seg.dcm")
            files = read_dicom_series(a)[1]["files"]
            back = read_seg_labels(tmp_path / "seg.dcm", files)  # references exactly the source instances
            labels = back["labels"][..., 0] if back["labels"].ndim == 4 else back["labels"]
            nifti = np.moveaxis(np.asarray(nib.load(tmp_path / "out" / "mask.nii.gz").dataobj), 2, 0)
            np.testing.assert_array_equal(labels, nifti)
            w = plan_windows((40, 40), (32, 32), 0.25, 16)
            x = read_dicom_series(a)[0]
            with torch.no_grad():
                logits = model(torch.from_numpy(cut(x, w))).numpy()
            assert nifti.any()
            assert_faithful(nifti, np.stack([stitch(logits[:, c], w) for c in range(logits.shape[1])], 1))
            # two image series in one study: refused, both named
            with pytest.raises(BlindsegError, match="holds 2 image series .1.2.826.1.3.1: CT"):
                await dep.client("data_owner", "pacs", "--model", "m", "--pacs", pacs.dicomweb, "--study",
                                 "1.2.826.1.3", "--out", str(tmp_path / "out3"), "--quiet", timeout=300)
            # a watcher: the done study is skipped, the refused one logged, the new one segmented
            web.store_instances(datasets=[pydicom.dcmread(f) for f in sorted(b.iterdir())])
            rep = await dep.client("data_owner", "pacs", "--model", "m", "--pacs", pacs.dicomweb, "--watch",
                                   "--max-studies", "1", "--interval", "0.5", "--out", str(tmp_path / "watch"),
                                   "--quiet", timeout=300)
            assert rep["pacs"]["study"] == "1.2.826.1.2"
            assert [p.name for p in (tmp_path / "watch").iterdir()] == ["1.2.826.1.2"]
            assert len(web.search_for_series("1.2.826.1.2", search_filters={"Modality": "SEG"})) == 1
        finally:
            dep.stop()
            await broker.stop()


def test_jobs_of_a_scan_are_all_the_same_size_and_fit_the_material_budget():
    """One batch size per scan (one warm dealer pool): jobs x per-job covers every window with fewer
    than one padding window per job; 'auto' stays within the per-server material budget."""
    from blindseg.compiler import compile_model
    from blindseg.layout import Layout
    from blindseg.models import load_named_model
    from data_owner.pipeline import AUTO_JOB_BYTES, job_sizes

    model, samples, _ = load_named_model("ref-unet", 32)
    plan = compile_model(model, (1, 32, 32), "mask", "auto", samples=samples).plan
    for windows in (1, 5, 8, 9, 20, 236, 1000):
        for batch in (1, 3, 8, 16):
            jobs, per = job_sizes(windows, plan, batch)
            assert per <= batch and jobs * per >= windows and jobs * per - windows < jobs
    jobs, per = job_sizes(1000, plan, None)
    assert Layout.of(plan, per).material_bytes() <= AUTO_JOB_BYTES
    assert per == 16 or Layout.of(plan, per + 1).material_bytes() > AUTO_JOB_BYTES
