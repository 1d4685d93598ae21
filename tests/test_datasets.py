"""Task config, degradations, built-in and folder datasets, the disk cache and patch sampling."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import torch

import ehrsr.data.cache as cache_module
import ehrsr.data.prepare as prepare_module
import ehrsr.data.trainset as trainset_module
from ehrsr.data import (
    BUILTIN_TRAIN,
    BUILTIN_VAL,
    ImageReadError,
    TaskConfig,
    TrainSet,
    ValSet,
    imresize,
    prepare_data,
)
from ehrsr.data.degradations import gaussian_blur, jpeg_compress
from tests.data_helpers import synthetic_image, write_image

# ---------------------------------------------------------------------------------------------
# TaskConfig


def test_task_defaults():
    assert TaskConfig().to_dict() == {"task": "sr", "scale": 4, "noise_sigma": 0.0, "blur_sigma": 0.0, "jpeg_quality": None}
    assert TaskConfig(task="denoise").scale == 1 and TaskConfig(task="denoise").noise_sigma == 25.0
    assert TaskConfig(task="deblur").blur_sigma == 1.6 and TaskConfig(task="deblur").scale == 1
    assert TaskConfig(task="jpeg").jpeg_quality == 10
    assert TaskConfig(task="sr", scale=2, noise_sigma=5).describe() == (
        "x2 SR (LR = MATLAB bicubic x1/2, then Gaussian noise sigma=5/255)"
    )
    assert TaskConfig(task="denoise", noise_sigma=50).describe() == "denoising (LR = Gaussian noise sigma=50/255)"


def test_task_round_trip():
    task = TaskConfig.from_dict({"task": "jpeg", "jpeg_quality": 30, "noise_sigma": 2})
    assert TaskConfig.from_dict(task.to_dict()) == task
    assert TaskConfig(noise_sigma=25) == TaskConfig.from_dict({"noise_sigma": 25.0})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"task": "sr", "sigma": 3}, r"unknown configuration key 'sigma'; valid keys: task, scale, noise_sigma"),
        ({"task": "inpaint"}, r"task must be one of 'sr', 'denoise', 'deblur', 'jpeg', got 'inpaint'"),
        ({"scale": 5}, r"scale must be 1, 2, 3 or 4, got 5"),
        ({"scale": 1}, r"task 'sr' needs scale 2, 3 or 4"),
        ({"noise_sigma": -1}, r"noise_sigma must be a number in \[0, 255\], got -1"),
        ({"jpeg_quality": 101}, r"jpeg_quality must be an integer in 1..100"),
        ({"jpeg_quality": True}, r"jpeg_quality must be an integer"),
        ({"task": "denoise", "noise_sigma": 0}, r"task 'denoise' needs noise_sigma > 0"),
        ({"blur_sigma": "big"}, r"blur_sigma must be a number"),
    ],
)
def test_task_rejects_bad_values_naming_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------
# built-in sample images and the cache


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    train, val = prepare_data(TaskConfig(scale=4), cache_dir=cache, progress=False)
    return cache, train, val


def test_builtin_split_is_fixed_colour_only_and_disjoint(builtin):
    _, train, val = builtin
    assert train.names == [n.rsplit(".", 1)[0] for n in BUILTIN_TRAIN]
    # built-in validation images are evaluated as fixed 128 px HR (32 px LR) tiles: 3x2 of chelsea, 4x3 of coffee
    assert sorted({n.split("@")[0] for n in val.names}) == [n.rsplit(".", 1)[0] for n in BUILTIN_VAL]
    assert len(val) == 18 and val.names[:2] == ["chelsea@r0c0", "chelsea@r0c1"] and val.names[-1] == "coffee@r2c3"
    assert not set(train.names) & set(val.names)
    assert "camera" not in train.names + val.names  # grayscale images are left out
    assert train.is_builtin and val.is_builtin
    assert "chelsea" in val.description and "MATLAB bicubic x1/4" in val.description


def test_builtin_val_lr_is_rounded_matlab_bicubic_of_mod_cropped_hr(builtin):
    _, _, val = builtin
    item = val[1]  # chelsea's tile in row 0, column 1: LR columns 32-63 of the whole degraded image
    chelsea = skimage.data.chelsea()  # 300 x 451
    np.testing.assert_array_equal(item.hr, chelsea[:128, 128:256])
    expected = np.clip(np.round(imresize(chelsea[:300, :448] / 255.0, 0.25) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(item.lr, expected[:32, 32:64])
    assert item.lr.shape == (32, 32, 3) and item.lr.dtype == np.uint8


def test_second_preparation_loads_the_cache_without_decoding_or_resizing(builtin, monkeypatch):
    cache, train, val = builtin
    files = sorted(p.name for p in (cache / "data").iterdir())
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(prepare_module, "read_image_noted", forbidden)
    monkeypatch.setattr(trainset_module, "degrade_base", forbidden)
    train2, val2 = prepare_data(TaskConfig(scale=4), cache_dir=cache, progress=False)
    assert torch.equal(train2.hr.buffer, train.hr.buffer) and torch.equal(train2.lr.buffer, train.lr.buffer)
    np.testing.assert_array_equal(val2[1].lr, val[1].lr)


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EHRSR_CACHE", str(tmp_path / "env-cache"))
    assert cache_module.default_cache_dir() == tmp_path / "env-cache"


# ---------------------------------------------------------------------------------------------
# folders


@pytest.fixture
def hr_folder(tmp_path):
    folder = tmp_path / "HR"
    write_image(folder / "a.png", synthetic_image(50, 61, 1))
    write_image(folder / "b.PNG", synthetic_image(48, 40, 2))
    write_image(folder / "c.bmp", synthetic_image(33, 45, 3))
    write_image(folder / "d.tif", synthetic_image(40, 40, 4)[:, :, 0])  # grayscale
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_hr_folder_mod_crops_and_makes_lr(hr_folder, tmp_path):
    train, val = prepare_data(TaskConfig(scale=4), hr_folder, hr_folder, cache_dir=tmp_path / "c", progress=False)
    assert val.names == ["a", "b", "c", "d"] and not val.is_builtin
    shapes = {item.name: (item.hr.shape, item.lr.shape) for item in val}
    assert shapes["a"] == ((48, 60, 3), (12, 15, 3))
    assert shapes["c"] == ((32, 44, 3), (8, 11, 3))
    gray = val[3].hr
    assert np.array_equal(gray[:, :, 0], gray[:, :, 1]) and np.array_equal(gray[:, :, 1], gray[:, :, 2])
    assert len(train) == 4 and train.max_patch_size == 12  # a: 12x15 LR


def test_cache_key_follows_file_contents(hr_folder, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    _, val = prepare_data(TaskConfig(scale=2), hr_folder, hr_folder, cache_dir=cache, progress=False)
    write_image(hr_folder / "a.png", synthetic_image(50, 61, 99))  # new content, size and mtime
    reads = []
    original = prepare_module.read_image_noted
    monkeypatch.setattr(prepare_module, "read_image_noted", lambda p: reads.append(p.name) or original(p))
    _, val2 = prepare_data(TaskConfig(scale=2), hr_folder, hr_folder, cache_dir=cache, progress=False)
    assert "a.png" in reads
    assert not np.array_equal(val2[0].hr, val[0].hr)
    np.testing.assert_array_equal(val2[1].hr, val[1].hr)
    # a different task is a different entry as well
    prepare_data(TaskConfig(scale=3), hr_folder, hr_folder, cache_dir=cache, progress=False)
    assert len(list((cache / "data").glob("val-*.npz"))) == 3


def test_two_workers_preparing_the_same_cache_at_once(hr_folder, tmp_path):
    cache = tmp_path / "shared"
    results, errors = [], []

    def work():
        try:
            results.append(prepare_data(TaskConfig(scale=2), hr_folder, hr_folder, cache_dir=cache, progress=False))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name.split("-")[0] for p in (cache / "data").iterdir()) == ["train", "val"]  # no temp files
    for train, val in results[1:]:
        assert torch.equal(train.hr.buffer, results[0][0].hr.buffer)
        np.testing.assert_array_equal(val[2].lr, results[0][1][2].lr)


def test_paired_folders_match_names_and_crop_hr(tmp_path):
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR_bicubic" / "X2"
    hr_a, hr_b = synthetic_image(41, 50, 1), synthetic_image(30, 30, 2)
    write_image(hr_dir / "0801.png", hr_a)
    write_image(hr_dir / "baby.png", hr_b)
    lr_a, lr_b = synthetic_image(20, 25, 3), synthetic_image(15, 15, 4)
    write_image(lr_dir / "0801x2.png", lr_a)  # DIV2K naming
    write_image(lr_dir / "baby.png", lr_b)  # same name
    train, val = prepare_data(
        TaskConfig(scale=2), hr_dir, hr_dir, train_lr_dir=lr_dir, val_lr_dir=lr_dir, cache_dir=tmp_path / "c", progress=False
    )
    np.testing.assert_array_equal(val[0].lr, lr_a)
    np.testing.assert_array_equal(val[0].hr, hr_a[:40, :50])
    np.testing.assert_array_equal(val[1].lr, lr_b)
    assert "LR read from" in val.description
    lr, hr = train.sample(4, 8, torch.Generator().manual_seed(0))
    assert lr.shape == (4, 3, 8, 8) and hr.shape == (4, 3, 16, 16)


def test_paired_size_mismatch_and_missing_lr_are_named(tmp_path):
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR"
    write_image(hr_dir / "img1.png", synthetic_image(40, 40, 1))
    write_image(lr_dir / "img1x2.png", synthetic_image(10, 10, 2))
    with pytest.raises(ValueError, match=r"img1: LR image is 10x10 and HR 40x40, which is not a x2 pair"):
        prepare_data(TaskConfig(scale=2), hr_dir, hr_dir, val_lr_dir=lr_dir, cache_dir=tmp_path / "c", progress=False)
    write_image(hr_dir / "img2.png", synthetic_image(20, 20, 3))
    with pytest.raises(ValueError, match=r"no LR image in .*LR for 1 HR image\(s\) \(img2.png\)"):
        prepare_data(TaskConfig(scale=2), hr_dir, hr_dir, val_lr_dir=lr_dir, cache_dir=tmp_path / "c", progress=False)


def test_corrupt_image_error_names_the_file(hr_folder, tmp_path):
    (hr_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ImageReadError, match=r"cannot read image .*broken\.png"):
        prepare_data(TaskConfig(scale=2), hr_folder, None, cache_dir=tmp_path / "c", progress=False)


def test_empty_and_missing_folders(tmp_path):
    empty = tmp_path / "empty"
    (empty / "HR").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"image folder .*empty is empty: no png/jpg/.*sub-folders \(HR\)"):
        prepare_data(TaskConfig(), empty, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match=r"image folder does not exist: .*nowhere"):
        prepare_data(TaskConfig(), tmp_path / "nowhere", cache_dir=tmp_path / "c", progress=False)


# ---------------------------------------------------------------------------------------------
# degradations


def test_validation_noise_is_deterministic_per_image_and_has_the_right_level():
    images = [np.full((64, 64, 3), 128, np.uint8), np.full((64, 64, 3), 128, np.uint8)]
    task = TaskConfig(task="denoise", noise_sigma=25)
    a = ValSet.from_images(images, task, names=["x", "y"])
    b = ValSet.from_images(images, task, names=["x", "y"])
    np.testing.assert_array_equal(a[0].lr, b[0].lr)
    assert not np.array_equal(a[0].lr, a[1].lr)  # seeded by the name, not shared
    noise = a[0].lr.astype(float) - 128
    assert abs(noise.std() - 25) < 1.0 and abs(noise.mean()) < 1.0


def test_deblur_matches_scipy_gaussian_filter():
    hr = synthetic_image(40, 48, 5)
    val = ValSet.from_images([hr], TaskConfig(task="deblur", blur_sigma=1.6))
    reference = scipy.ndimage.gaussian_filter(hr.astype(np.float64), sigma=(1.6, 1.6, 0), mode="reflect", truncate=4.0)
    diff = np.abs(val[0].lr.astype(int) - np.round(reference).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    np.testing.assert_allclose(gaussian_blur(hr / 255.0, 1.6) * 255, reference, atol=1e-9)


def test_jpeg_and_noise_before_jpeg_are_precomputed():
    hr = [synthetic_image(40, 40, 6)]
    jpeg = TrainSet.from_images(hr, TaskConfig(task="jpeg", jpeg_quality=20))
    assert jpeg.variants == 1 and jpeg.online_noise_sigma == 0
    np.testing.assert_array_equal(jpeg.lr.image(0), jpeg_compress(hr[0], 20))
    both = TrainSet.from_images(hr, TaskConfig(task="jpeg", jpeg_quality=20, noise_sigma=10))
    assert both.variants == 4 and both.online_noise_sigma == 0 and len(both.lr) == 4
    assert not np.array_equal(both.lr.image(0), both.lr.image(1))


# ---------------------------------------------------------------------------------------------
# patch sampling


def coordinate_images(scale: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """HR/LR images whose pixels encode their own coordinates: R = x, G = y, B = image id."""
    hr_list, lr_list = [], []
    for image_id, (h, w) in enumerate([(10, 12), (16, 9)]):
        y, x = np.mgrid[0:h, 0:w]
        lr_list.append(np.stack([x, y, np.full_like(x, 100 + image_id)], axis=2).astype(np.uint8))
        y, x = np.mgrid[0 : h * scale, 0 : w * scale]
        hr_list.append(np.stack([x, y, np.full_like(x, 100 + image_id)], axis=2).astype(np.uint8))
    return hr_list, lr_list


def test_patches_are_matching_crops_under_one_of_eight_transforms():
    scale, p = 3, 5
    hr_list, lr_list = coordinate_images(scale)
    train = TrainSet.from_images(hr_list, TaskConfig(scale=scale), lr_images=lr_list)
    lr, hr = train.sample(64, p, torch.Generator().manual_seed(1))
    assert lr.shape == (64, 3, p, p) and hr.shape == (64, 3, p * scale, p * scale) and lr.dtype == torch.float32
    lr8 = (lr * 255).round().to(torch.int64)
    hr8 = (hr * 255).round().to(torch.int64)
    transforms = set()
    for b in range(64):
        lx, ly, hx, hy = lr8[b, 0], lr8[b, 1], hr8[b, 0], hr8[b, 1]
        assert lr8[b, 2].unique().tolist() == hr8[b, 2].unique().tolist()  # same image
        # every HR pixel lies in the HR block of the LR pixel at the same patch position
        assert torch.equal(hx // scale, lx.repeat_interleave(scale, 0).repeat_interleave(scale, 1))
        assert torch.equal(hy // scale, ly.repeat_interleave(scale, 0).repeat_interleave(scale, 1))
        # the patch is a whole square crop (each coordinate pair once)
        pairs = set(zip(hx.flatten().tolist(), hy.flatten().tolist()))
        assert len(pairs) == (p * scale) ** 2 and max(hx.max() - hx.min(), hy.max() - hy.min()) == p * scale - 1
        transposed = bool(lx[0, 1] == lx[0, 0])  # x constant along a row: axes swapped
        row_axis = lx if transposed else ly
        col_axis = ly if transposed else lx
        transforms.add((transposed, bool(row_axis[1, 0] < row_axis[0, 0]), bool(col_axis[0, 1] < col_axis[0, 0])))
    assert len(transforms) == 8


def test_sampling_is_uniform_over_positions():
    # LR 10x10 and 20x20 with 5x5 patches: 36 and 256 positions -> the big one 256/292 of the time
    images = [np.zeros((10, 10, 3), np.uint8), np.full((20, 20, 3), 255, np.uint8)]
    train = TrainSet.from_images(images, TaskConfig(task="jpeg"), lr_images=images)
    lr, _ = train.sample(4000, 5, torch.Generator().manual_seed(0))
    share = (lr[:, 0, 0, 0] > 0.5).float().mean().item()
    assert abs(share - 256 / 292) < 0.03


def test_same_seed_same_batch_and_gather_equals_loop():
    hr_list, lr_list = coordinate_images(2)
    train = TrainSet.from_images(hr_list, TaskConfig(scale=2), lr_images=lr_list)
    a = train.sample(8, 4, torch.Generator().manual_seed(3))
    b = train.sample(8, 4, torch.Generator().manual_seed(3))
    c = train.sample(8, 4, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    index, top, left = torch.tensor([0, 1, 1]), torch.tensor([0, 3, 5]), torch.tensor([2, 0, 4])
    transform = torch.tensor([0, 5, 7])
    looped = train.hr.crop_loop(index, top, left, 6, transform, torch.empty(3, 3, 6, 6, dtype=torch.uint8))
    assert torch.equal(train.hr.gather(index, top, left, 6, transform), looped)


def test_denoise_training_noise_is_fresh_and_on_uint8_levels():
    flat = [np.full((40, 40, 3), 128, np.uint8)]
    train = TrainSet.from_images(flat, TaskConfig(task="denoise", noise_sigma=15))
    assert train.lr is train.hr  # the clean image is stored once
    generator = torch.Generator().manual_seed(0)
    lr1, hr1 = train.sample(16, 16, generator)
    lr2, _ = train.sample(16, 16, generator)
    assert torch.all(hr1 == 128 / 255)
    noise = lr1 * 255 - 128
    assert abs(noise.std().item() - 15) < 0.5
    assert torch.allclose(noise, noise.round(), atol=1e-3)  # quantised like a saved image
    assert not torch.equal(lr1, lr2)


def test_patch_larger_than_every_image_is_explained(builtin):
    _, train, _ = builtin
    with pytest.raises(ValueError, match=r"patch_size 500 \(LR pixels\) is larger than every training image"):
        train.sample(2, 500, torch.Generator())
    assert train.to("cpu") is train


def _png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG (grey, or RGB): Pillow writes no 16-bit RGB, so the file is built by hand."""
    import struct
    import zlib

    height, width, channels = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 3: 2}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_converted_images_are_said_once_per_folder_and_kept_in_the_description(tmp_path, caplog):
    from PIL import Image

    from ehrsr.data.io import read_image, read_image_noted

    folder = tmp_path / "mixed"
    folder.mkdir()
    rgb = synthetic_image(32, 32, seed=1)
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(folder / "b_gray.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 7, np.uint8)])).save(folder / "c_rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "d_cmyk.tif")
    _png16(folder / "e_gray16.png", rgb[:, :, :1].astype(np.uint16) * 257)
    _png16(folder / "f_rgb16.png", rgb.astype(np.uint16) * 256 + 100)
    Image.fromarray(rgb).convert("P").save(folder / "g_palette.png")  # lossless expansion: no note
    # converted exactly as before: the notes are the only change
    assert np.array_equal(read_image(folder / "e_gray16.png"), np.repeat(rgb[:, :, :1], 3, axis=2))
    assert np.array_equal(read_image(folder / "f_rgb16.png"), rgb)  # the high byte of v * 256 + 100
    assert np.array_equal(read_image(folder / "c_rgba.png"), rgb)
    assert [read_image_noted(p)[1] for p in sorted(folder.iterdir())] == [
        (), ("grayscale replicated to 3 channels",), ("alpha dropped",), ("CMYK converted to RGB",),
        ("16-bit reduced to 8 bits", "grayscale replicated to 3 channels"), ("16-bit reduced to 8 bits",), (),
    ]
    expected = (f"{folder}: converted to 8-bit RGB: grayscale replicated to 3 channels: 2 images (b_gray.png, "
                "e_gray16.png); alpha dropped: 1 image (c_rgba.png); CMYK converted to RGB: 1 image (d_cmyk.tif); "
                "16-bit reduced to 8 bits: 2 images (e_gray16.png, f_rgb16.png)")
    with caplog.at_level("WARNING", logger="ehrsr.data"):
        _, val = prepare_data(TaskConfig(scale=2), None, folder, cache_dir=tmp_path / "c", progress=False)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("ehrsr.data")] == [expected]
    assert val.description.endswith(f"; {expected}")
    caplog.clear()
    with caplog.at_level("WARNING", logger="ehrsr.data"):  # from the cache: said in the description only
        _, again = prepare_data(TaskConfig(scale=2), None, folder, cache_dir=tmp_path / "c", progress=False)
    assert not [r for r in caplog.records if r.name.startswith("ehrsr.data")]
    assert again.description == val.description
