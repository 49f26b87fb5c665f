"""Stage `prepare`: reference photos in, square RGB PNGs + captions out, or one clear error."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_one_line, edit_params, paths
from PIL import Image, ImageOps

from proxytune.io import read_jsonl
from proxytune.params import ProxytuneError, load_params
from tasks import prepare


def noisy(size=(96, 80), mode="RGB", seed=0) -> Image.Image:
    """A photo-like image (random content, so JPEG data is not trivially small)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(arr, "RGB")


def write_good(folder: Path, n: int = 3, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(start, start + n):
        p = folder / f"good{i}.jpg"
        noisy(seed=i).save(p, quality=90)
        files.append(p)
    return files


def use_folder(params: dict, folder: Path) -> dict:
    params["subject"]["images"] = str(folder)
    return params


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def out_of(project: Path) -> Path:
    """Where `prepare` writes in the test folder (dvc.yaml's outputs/prepare)."""
    return paths(project, "prepare")["out"]


def run_prepare(params: dict, log, project: Path) -> dict:
    return prepare.run(params, log, paths(project, "prepare"))


def leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in out_of(project).parent.iterdir() if p.name.startswith((".prepare.tmp-", ".prepare.old-")))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the demo subject


def test_demo_subject_is_prepared(project, log):
    params = load_params(project / "params.yaml")
    res = int(params["prepare"]["resolution"])
    out = out_of(project)
    result = run_prepare(params, log, project)

    assert Path(result["instance_dir"]) == out / "instance"
    assert Path(result["captions"]) == out / "captions.jsonl"
    pngs = sorted((out / "instance").glob("*.png"))
    assert [p.name for p in pngs] == ["00.png", "01.png", "02.png", "03.png"]
    for p in pngs:
        with Image.open(p) as img:
            assert img.format == "PNG"
            assert img.size == (res, res)
            assert img.mode == "RGB"

    rows = read_jsonl(out / "captions.jsonl")
    assert len(rows) == 4
    assert [r["source"] for r in rows] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
    for i, row in enumerate(rows):
        assert row["file"] == f"instance/{i:02d}.png"
        assert row["caption"] == "a sks toy"  # the world's caption (params.yaml's subject.caption)
        assert row["sha256"] == sha256(out / row["file"])
    assert ({"num_references": 4}, None) in log.logged
    assert leftovers(project) == []


def test_captions_follow_the_subject_caption_template(project, log):
    params = load_params(project / "params.yaml")
    params["subject"]["caption"] = "a photo of {}"
    run_prepare(params, log, project)
    assert {r["caption"] for r in read_jsonl(out_of(project) / "captions.jsonl")} == {"a photo of sks toy"}


def test_exif_rotated_demo_image_comes_out_upright(project, log):
    params = load_params(project / "params.yaml")
    res = int(params["prepare"]["resolution"])
    src = project / "data/demo_subject/03.jpg"
    with Image.open(src) as raw:
        assert raw.getexif().get(0x0112) == 6, "fixture assumption: 03.jpg carries EXIF orientation 6"
        raw.load()
        upright = ImageOps.exif_transpose(raw).convert("RGB")
        stored = raw.convert("RGB")
    fit = lambda im: np.asarray(ImageOps.fit(im, (res, res), method=Image.Resampling.LANCZOS), dtype=float)  # noqa: E731

    run_prepare(params, log, project)
    with Image.open(out_of(project) / "instance/03.png") as out:
        got = np.asarray(out.convert("RGB"), dtype=float)

    diff_upright = np.abs(got - fit(upright)).mean()
    diff_stored = np.abs(got - fit(stored)).mean()
    # the stage runs these very PIL ops (exif_transpose, RGB, LANCZOS fit) on the same file: identical pixels
    assert diff_upright == 0, diff_upright
    # Not rotated would look clearly different (the toy's band and star turn by 90 degrees).
    assert diff_stored > 10 * max(diff_upright, 0.5), (diff_upright, diff_stored)


def test_hidden_files_are_ignored(project, log, tmp_path):
    folder = tmp_path / "refs"
    write_good(folder, 2)
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / "sub").mkdir()
    run_prepare(use_folder(load_params(project / "params.yaml"), folder), log, project)
    rows = read_jsonl(out_of(project) / "captions.jsonl")
    assert [r["source"] for r in rows] == ["good0.jpg", "good1.jpg"]


# ---------------------------------------------------------------- odd colour modes


def test_odd_modes_become_rgb(project, log, tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    size = (96, 96)

    rgba = Image.new("RGBA", size, (0, 0, 0, 0))  # fully transparent -> white background
    rgba.paste((200, 0, 0, 255), (0, 0, 96, 48))  # opaque red top half
    rgba.save(folder / "a_rgba.png")

    pal = Image.new("P", size, 0)
    pal.putpalette([0, 0, 255] + [0, 0, 0] * 255)  # index 0 = blue
    pal.save(folder / "b_palette.png")

    Image.new("L", size, 128).save(folder / "c_grey.png")
    Image.new("LA", size, (60, 255)).save(folder / "d_grey_alpha.png")
    Image.new("CMYK", size, (0, 255, 255, 0)).save(folder / "e_cmyk.jpg", quality=95)  # red
    Image.new("1", size, 1).save(folder / "f_bilevel.png")

    for p in folder.iterdir():  # make sure the inputs really are in those modes
        with Image.open(p) as im:
            assert im.mode != "RGB", p

    run_prepare(use_folder(load_params(project / "params.yaml"), folder), log, project)
    rows = read_jsonl(out_of(project) / "captions.jsonl")
    assert [r["source"] for r in rows] == sorted(p.name for p in folder.iterdir())

    res = int(load_params(project / "params.yaml")["prepare"]["resolution"])

    def px(i, xy=(res // 2, res // 2)):
        with Image.open(out_of(project) / f"instance/{i:02d}.png") as im:
            assert im.mode == "RGB" and im.size == (res, res)
            return np.array(im.getpixel(xy))

    assert np.abs(px(0, (res // 2, 2)) - (200, 0, 0)).max() <= 3             # RGBA opaque part keeps its colour
    assert np.abs(px(0, (res // 2, res - 3)) - (255, 255, 255)).max() <= 3  # transparent part -> white, not black
    assert np.abs(px(1) - (0, 0, 255)).max() <= 3                # palette
    assert np.abs(px(2) - (128, 128, 128)).max() <= 3            # greyscale
    assert np.abs(px(3) - (60, 60, 60)).max() <= 3               # greyscale + alpha
    assert np.abs(px(4) - (255, 0, 0)).max() <= 12              # CMYK (JPEG-compressed)
    assert np.abs(px(5) - (255, 255, 255)).max() <= 3            # 1-bit


def gradient(mode: str, size=(96, 80)) -> Image.Image:
    """A left-to-right ramp over the whole range of `mode` (0..1 for float)."""
    ramp = np.tile(np.linspace(0, 1, size[0]), (size[1], 1))
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32), "F")
    if mode == "I":
        return Image.fromarray((ramp * 65535).astype(np.int32), "I")
    big_endian = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, size, (ramp * 65535).astype(big_endian).tobytes())


@pytest.mark.parametrize("mode, ext", [("I;16", "png"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif")])
def test_high_bit_depth_greyscale_keeps_its_tones(tmp_path, mode, ext):
    """16-bit and float photos are scaled to 8 bits by their range, not clipped to white."""
    path = tmp_path / f"ramp.{ext}"
    gradient(mode).save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode, "fixture assumption: the file keeps its mode"
    grey = np.asarray(prepare.load_reference(path, 16), dtype=float)[..., 0]
    row = grey[40]
    assert row[0] <= 2 and row[-1] >= 253, (row[0], row[-1])
    assert np.all(np.diff(row) >= 0), "the ramp still rises left to right"
    assert abs(grey.mean() - 127.5) < 3, grey.mean()


def test_identical_photos_warn_naming_them(project, log, tmp_path, caplog):
    folder = tmp_path / "refs"
    write_good(folder, 2)
    (folder / "copy.jpg").write_bytes((folder / "good0.jpg").read_bytes())
    with caplog.at_level("WARNING"):
        run_prepare(use_folder(load_params(project / "params.yaml"), folder), log, project)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "copy.jpg, good0.jpg" in warned[0] and "good1.jpg" not in warned[0], warned
    assert len(read_jsonl(out_of(project) / "captions.jsonl")) == 3, "a warning, not an error"


def test_different_photos_do_not_warn(project, log, tmp_path, caplog):
    write_good(tmp_path / "refs", 3)
    with caplog.at_level("WARNING"):
        run_prepare(use_folder(load_params(project / "params.yaml"), tmp_path / "refs"), log, project)
    assert not [r for r in caplog.records if "identical" in r.getMessage()]


# ---------------------------------------------------------------- bad input


def _case_empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder, [str(folder)]


def _case_single(tmp_path):
    folder = tmp_path / "single"
    write_good(folder, 1)
    return folder, [str(folder)]


def _case_not_an_image(tmp_path):
    folder = tmp_path / "withtext"
    write_good(folder, 3)
    (folder / "notes.txt").write_text("taken with my phone\n")
    return folder, ["notes.txt"]


def _case_truncated(tmp_path):
    folder = tmp_path / "truncated"
    write_good(folder, 2)
    bad = folder / "cut.jpg"
    noisy(size=(128, 128), seed=9).save(bad, quality=95)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return folder, ["cut.jpg"]


def _case_tiny(tmp_path):
    folder = tmp_path / "tiny"
    write_good(folder, 2)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "dot.png")
    return folder, ["dot.png"]


def _case_missing(tmp_path):
    return tmp_path / "no" / "such" / "folder", ["subject.images"]


def _case_is_a_file(tmp_path):
    files = write_good(tmp_path / "afile", 2)
    return files[0], ["subject.images"]


BAD = {
    "empty": _case_empty,
    "single": _case_single,
    "not_an_image": _case_not_an_image,
    "truncated": _case_truncated,
    "1x1": _case_tiny,
    "missing": _case_missing,
    "is_a_file": _case_is_a_file,
}


@pytest.fixture
def earlier_output(project, log):
    """A successful run on the demo subject first; returns its bytes."""
    run_prepare(load_params(project / "params.yaml"), log, project)
    before = snapshot(out_of(project))
    assert len(before) == 5
    return before


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_cleanly(project, earlier_output, tmp_path, log, case):
    folder, names = BAD[case](tmp_path)
    params = use_folder(load_params(project / "params.yaml"), folder)
    with pytest.raises(ProxytuneError) as err:
        run_prepare(params, log, project)
    assert_one_line(err, *names)
    assert snapshot(out_of(project)) == earlier_output
    assert leftovers(project) == []


def test_unsafe_subject_name_rejected_by_load_params(project, earlier_output, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["subject"]["name"] = "../x"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, "subject.name", "../x")
    assert snapshot(out_of(project)) == earlier_output
    assert leftovers(project) == []


@pytest.mark.parametrize("value", [4, "abc", 36])
def test_bad_resolution_names_parameter(project, earlier_output, value):
    edit_params(project, "prepare", resolution=value)
    with pytest.raises(ProxytuneError) as err:
        load_params(project / "params.yaml")
    assert_one_line(err, "prepare.resolution")
    assert snapshot(out_of(project)) == earlier_output


@pytest.mark.parametrize("side", [120, 200])
def test_decompression_bomb_names_file(project, earlier_output, tmp_path, log, monkeypatch, side):
    folder = tmp_path / "bomb"
    write_good(folder, 2)  # 96x80 px: under the lowered limit
    Image.new("RGB", (side, side)).save(folder / "huge.png")
    # With the limit lowered to 10,000 px: 120x120 only warns (DecompressionBombWarning),
    # 200x200 is over twice the limit, so PIL raises DecompressionBombError on open.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ProxytuneError) as err:
        run_prepare(use_folder(load_params(project / "params.yaml"), folder), log, project)
    assert_one_line(err, "huge.png")
    assert snapshot(out_of(project)) == earlier_output
    assert leftovers(project) == []


def test_failure_while_writing_keeps_earlier_output(project, earlier_output, tmp_path, log, monkeypatch):
    """A crash half-way through writing must not leave half an output folder."""
    write_good(tmp_path / "refs", 3)
    real_square = prepare.square
    calls = []

    def flaky(img, resolution):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_square(img, resolution)

    monkeypatch.setattr(prepare, "square", flaky)
    with pytest.raises(RuntimeError):
        run_prepare(use_folder(load_params(project / "params.yaml"), tmp_path / "refs"), log, project)
    assert len(calls) == 2
    assert snapshot(out_of(project)) == earlier_output
    assert leftovers(project) == []


def test_rerun_replaces_output(project, earlier_output, tmp_path, log):
    write_good(tmp_path / "refs", 2)
    run_prepare(use_folder(load_params(project / "params.yaml"), tmp_path / "refs"), log, project)
    after = snapshot(out_of(project))
    assert sorted(after) == ["captions.jsonl", "instance/00.png", "instance/01.png"]
    assert leftovers(project) == []
