"""The dataset check: each defect a real COCO-format set carries is refused (file and id named, exit 2, no MLflow
run, no Ray) or fixed and counted; images decode like detection libraries read them; undecodable ones are skipped."""
import copy
import io
import json
import os
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from grids import ROOT, run_grid_cmd, tiny_grid, write_grid
from lgd.data.check import DataError, check_dataset
from lgd.data.coco import CocoDetection, load_datasets
from lgd.data.images import EXIF_ORIENTATION, decode_rgb, read_header
from lgd.engine import train_loop

CATS = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]


def _img(i, w=40, h=30, name=None):
    return {"id": i, "file_name": name or f"{i}.png", "width": w, "height": h}


def _ann(i, img, cat=5, bbox=(2, 2, 10, 8)):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": list(bbox), "area": bbox[2] * bbox[3], "iscrowd": 0}


def _sets():
    return {"train": {"images": [_img(1), _img(2), _img(3)],
                      "annotations": [_ann(1, 1), _ann(2, 1, 9), _ann(3, 2), _ann(4, 3, 9, (20, 10, 15, 15))],
                      "categories": copy.deepcopy(CATS)},
            "val": {"images": [_img(11), _img(12)], "annotations": [_ann(21, 11), _ann(22, 12, 9)],
                    "categories": copy.deepcopy(CATS)}}


def _write(root, sets):
    """Each split's JSON, and an RGB PNG of the JSON's size for every image a test has not written itself."""
    paths = {}
    for split, data in sets.items():
        folder = root / split
        folder.mkdir(exist_ok=True)
        for im in data["images"]:
            f = folder / str(im.get("file_name"))
            if isinstance(im.get("file_name"), str) and not f.exists():
                size = (im["width"], im["height"]) if min(im["width"], im["height"]) > 0 else (40, 30)
                Image.new("RGB", size, (90, 120, 150)).save(f)
        (root / f"{split}.json").write_text(json.dumps(data))  # NaN is written as NaN, as json.dump does
        paths[f"{split}_images"], paths[f"{split}_annotations"] = str(folder), str(root / f"{split}.json")
    return paths


def _refused(paths, *fragments):
    with pytest.raises(DataError) as e:
        check_dataset(**paths)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# --- refused: the kinds of the issue ------------------------------------------------------------------------------
def test_string_in_bbox(tmp_path):
    s = _sets()
    s["train"]["annotations"][2]["bbox"] = ["2", 2, 10, 8]
    _refused(_write(tmp_path, s), "train.json", "annotation id 3", "field 'bbox[0]'", "valid number", "'2'")


def test_val_categories_differ_from_train(tmp_path):
    s = _sets()
    s["val"]["categories"] = [{"id": 5, "name": "a"}, {"id": 7, "name": "b"}]
    s["val"]["annotations"][1]["category_id"] = 7
    _refused(_write(tmp_path, s), "val.json: categories differ from", "train.json", "only in train: ids [9]",
             "only in val: ids [7]")


def test_val_category_named_differently(tmp_path):
    s = _sets()
    s["val"]["categories"][1]["name"] = "c"
    _refused(_write(tmp_path, s), "val.json", "named differently: id 9: 'b' vs 'c'")


def test_duplicate_image_ids(tmp_path):
    s = _sets()
    s["train"]["images"][2]["id"] = 2
    _refused(_write(tmp_path, s), "train.json", "images: id 2 is used by 2 entries")


def test_duplicate_annotation_ids_in_val(tmp_path):
    s = _sets()
    s["val"]["annotations"][1]["id"] = 21
    _refused(_write(tmp_path, s), "val.json", "annotations: id 21 is used by 2 entries")


def test_nan_coordinate(tmp_path):
    s = _sets()
    s["train"]["annotations"][3]["bbox"][2] = float("nan")
    _refused(_write(tmp_path, s), "train.json", "annotation id 4", "field 'bbox[2]'", "finite number")


def test_infinite_area(tmp_path):
    s = _sets()
    s["val"]["annotations"][0]["area"] = float("inf")
    _refused(_write(tmp_path, s), "val.json", "annotation id 21", "field 'area'", "finite number")


def test_image_size_disagrees_with_json(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (50, 30)).save(tmp_path / "train" / "2.png")
    _refused(_write(tmp_path, _sets()), "train.json", "image id 2", "2.png is 50x30", "the JSON says 40x30")


def test_annotation_pointing_at_a_missing_image(tmp_path):
    s = _sets()
    s["train"]["annotations"][1]["image_id"] = 99
    _refused(_write(tmp_path, s), "train.json", "annotation id 2: image_id 99 is not in images")


def test_truncated_image(tmp_path):
    (tmp_path / "train").mkdir()
    buf = io.BytesIO()
    _noise(40, 30).save(buf, "JPEG", quality=95)
    (tmp_path / "train" / "3.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    s = _sets()
    s["train"]["images"][2]["file_name"] = "3.jpg"
    _refused(_write(tmp_path, s), "train.json", "image id 3", "3.jpg (JPEG) is damaged or truncated", "truncated")


def test_file_name_that_is_not_an_image(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "12.png").write_text("id,label\n12,cat\n")
    _refused(_write(tmp_path, _sets()), "val.json", "image id 12", "12.png is not an image PIL can read")


# --- refused: more kinds a real user meets ------------------------------------------------------------------------
def test_negative_box_size(tmp_path):
    s = _sets()
    s["train"]["annotations"][0]["bbox"] = [12, 2, -10, 8]
    _refused(_write(tmp_path, s), "train.json", "annotation id 1", "width and height must be >= 0")


def test_missing_image_file(tmp_path):
    paths = _write(tmp_path, _sets())
    os.remove(tmp_path / "train" / "3.png")
    _refused(paths, "train.json", "image id 3", "3.png not found")


def test_category_id_not_in_categories(tmp_path):
    s = _sets()
    s["val"]["annotations"][0]["category_id"] = 3
    _refused(_write(tmp_path, s), "val.json", "annotation id 21: unknown category id 3")


def test_iscrowd_not_0_or_1(tmp_path):
    s = _sets()
    s["train"]["annotations"][0]["iscrowd"] = 2
    s["train"]["annotations"][1]["iscrowd"] = True
    _refused(_write(tmp_path, s), "train.json", "annotation id 1: field 'iscrowd'", "annotation id 2: field 'iscrowd'")


def test_segmentation_that_is_not_polygons_or_rle(tmp_path):
    s = _sets()
    s["train"]["annotations"][0]["segmentation"] = "2 2 12 2 12 10"
    s["train"]["annotations"][1]["segmentation"] = [[2, 2, 12, 2, 12]]  # under 3 points
    s["train"]["annotations"][2]["segmentation"] = {"size": [40, 30], "counts": "abc"}  # [w, h], not [h, w]
    _refused(_write(tmp_path, s), "train.json", "annotation id 1: field 'segmentation': must be a list of polygons",
             "annotation id 2: field 'segmentation'")
    s["train"]["annotations"] = s["train"]["annotations"][2:]
    _refused(_write(tmp_path, s), "annotation id 3: field 'segmentation': RLE size [40, 30]")
    s["train"]["annotations"][0]["segmentation"] = [[2, 2, 12, 2, 12, 10, 4]]
    _refused(_write(tmp_path, s), "annotation id 3: field 'segmentation': a polygon has an odd number")


def test_missing_fields_and_boolean_ids(tmp_path):
    s = _sets()
    del s["train"]["annotations"][0]["image_id"]
    s["train"]["images"][0]["id"] = True
    s["train"]["images"][1]["width"] = 0
    _refused(_write(tmp_path, s), "annotation id 1: field 'image_id' is missing", "image id True: field 'id'",
             "image id 2: field 'width'")


def test_two_image_entries_for_one_file(tmp_path):
    s = _sets()
    s["train"]["images"][2]["file_name"] = "2.png"
    _refused(_write(tmp_path, s), "train.json", "image ids 2, 3 all name file '2.png'")


def test_exif_rotation_with_the_stored_size_in_the_json_is_ambiguous(tmp_path):
    (tmp_path / "train").mkdir()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    _noise(40, 30).save(tmp_path / "train" / "1.jpg", exif=exif.tobytes())  # stored 40x30, shown 30x40
    s = _sets()
    s["train"]["images"][0]["file_name"] = "1.jpg"
    _refused(_write(tmp_path, s), "image id 1", "EXIF orientation 6 turns it into 30x40")


def test_not_json_and_not_coco(tmp_path):
    paths = _write(tmp_path, _sets())
    (tmp_path / "val.json").write_text('{"images": [')
    _refused(paths, "val.json: not valid JSON")
    (tmp_path / "val.json").write_text('{"images": {}, "annotations": [], "categories": []}')
    _refused(paths, "val.json: images must be a list")


# --- fixed and counted ------------------------------------------------------------------------------------------
def test_16_bit_png_is_scaled_by_its_real_range(tmp_path):
    (tmp_path / "train").mkdir()
    pixels = np.zeros((30, 40), dtype=np.uint16)
    pixels[:, 10:20], pixels[:, 20:] = 32896, 65535
    Image.fromarray(pixels).save(tmp_path / "train" / "2.png")
    assert read_header(tmp_path / "train" / "2.png").mode == "I;16"
    train, _ = load_datasets(**_write(tmp_path, _sets()))
    assert train.stats.high_depth_images == 1 and train.stats.converted_images == 0
    image = train[1][0]  # image id 2: no longer all white
    assert image.shape == (3, 30, 40)
    assert image[:, :, :10].max() == 0 and (image[:, :, 10:20] * 255).round().unique().tolist() == [128.0]
    assert image[:, :, 20:].min() == 1.0


def test_exif_rotated_jpeg_is_turned_like_the_boxes(tmp_path):
    (tmp_path / "train").mkdir()
    stored = np.zeros((40, 30, 3), dtype=np.uint8)  # stored 30 wide, 40 high
    stored[:10, :10] = 255  # a white square at the stored top-left
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90° clockwise to show": shown 40 wide, 30 high, the square top-right
    Image.fromarray(stored).save(tmp_path / "train" / "1.jpg", quality=95, exif=exif.tobytes())
    s = _sets()
    s["train"]["images"][0]["file_name"] = "1.jpg"  # the JSON has the shown size, 40x30
    s["train"]["annotations"][0]["bbox"] = [30, 0, 10, 10]  # the box around the square, as shown
    train, _ = load_datasets(**_write(tmp_path, s))
    assert train.stats.exif_oriented_images == 1
    image, target = train[0]
    assert image.shape == (3, 30, 40)
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    assert image[:, y1:y2, x1:x2].mean() > 0.95 and image[:, :10, :10].mean() < 0.05


def test_grey_palette_and_alpha_images_become_rgb(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("L", (40, 30), 200).save(tmp_path / "train" / "1.png")
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10])
    palette.save(tmp_path / "train" / "2.png")
    Image.new("RGBA", (40, 30), (10, 200, 10, 0)).save(tmp_path / "train" / "3.png")
    train, _ = load_datasets(**_write(tmp_path, _sets()))
    assert train.stats.converted_images == 3
    grey, palette, rgba = (train[i][0] for i in range(3))
    assert (grey * 255).round().unique().tolist() == [200.0]
    assert (palette[:, 0, 0] * 255).round().tolist() == [200.0, 10.0, 10.0]
    assert (rgba[:, 0, 0] * 255).round().tolist() == [10.0, 200.0, 10.0]


def test_missing_area_and_iscrowd_are_filled_and_counted(tmp_path):
    s = _sets()
    del s["val"]["annotations"][0]["area"], s["val"]["annotations"][0]["iscrowd"]
    s["val"]["annotations"][1]["segmentation"] = [[2, 2, 12, 2, 12, 10]]  # a right triangle: area 40
    del s["val"]["annotations"][1]["area"]
    _, val = load_datasets(**_write(tmp_path, s))
    assert (val.stats.filled_areas, val.stats.filled_iscrowd) == (2, 1)
    assert val.coco.anns[21]["area"] == 80.0 and val.coco.anns[22]["area"] == pytest.approx(40, abs=6)
    assert val.coco.anns[21]["iscrowd"] == 0


def test_bytes_after_the_end_marker_are_not_a_defect(tmp_path):
    (tmp_path / "train").mkdir()
    buf = io.BytesIO()
    _noise(40, 30).save(buf, "JPEG")
    (tmp_path / "train" / "1.jpg").write_bytes(buf.getvalue() + b"camera maker's trailer" * 10)
    s = _sets()
    s["train"]["images"][0]["file_name"] = "1.jpg"
    train, _ = load_datasets(**_write(tmp_path, s))
    assert train[0][0].shape == (3, 30, 40)


def test_decode_rgb_of_float_and_32_bit_images(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.array([[0, 1000, 4000]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert decode_rgb(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]
    assert decode_rgb(tmp_path / "i.tif")[0, :, 0].tolist() == [0, 4, 16]  # 16-bit data: value / 257


# --- end to end: run_grid.py and the trainer ----------------------------------------------------------------------
def _grid_file(tmp_path, paths):
    grid = tiny_grid("checked", [{"name": "t", "dataset": "real", "rows": ["detector"], "columns": ["method"],
                                  "grid": [{"detector": ["retinanet"], "method": ["baseline"]}]}])
    grid["datasets"] = {"real": paths}
    return write_grid(tmp_path, grid)


def _no_mlflow_no_ray(out, ray_tmp):
    assert not (out / "mlflow.db").exists() and not (out / "mlartifacts").exists()  # no MLflow store, no run
    assert not ray_tmp.exists() and not (out / "ray_storage").exists()  # Ray never started (it writes RAY_TMPDIR)


@pytest.mark.parametrize("defect", ["string_bbox", "truncated_image"])
def test_run_grid_refuses_before_mlflow_and_ray(tmp_path, defect):
    s = _sets()
    if defect == "string_bbox":
        s["train"]["annotations"][0]["bbox"][3] = "8"
        expected = ["train.json", "annotation id 1", "field 'bbox[3]'"]
    else:
        (tmp_path / "val").mkdir()
        buf = io.BytesIO()
        _noise(40, 30).save(buf, "PNG")
        (tmp_path / "val" / "12.png").write_bytes(buf.getvalue()[:-200])
        expected = ["val.json", "image id 12", "12.png (PNG) is damaged or truncated"]
    grid, out, ray_tmp = _grid_file(tmp_path, _write(tmp_path, s)), tmp_path / "out", tmp_path / "raytmp"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(run_grid_cmd(grid, out), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "error: " in r.stderr
    for fragment in expected:
        assert fragment in r.stderr, r.stderr
    _no_mlflow_no_ray(out, ray_tmp)


def test_run_grid_main_refuses_val_categories_that_differ(tmp_path, capsys, monkeypatch):
    from orchestration.run_grid import main

    s = _sets()
    s["val"]["categories"] = s["val"]["categories"][:1]
    s["val"]["annotations"] = s["val"]["annotations"][:1]
    grid, out, ray_tmp = _grid_file(tmp_path, _write(tmp_path, s)), tmp_path / "out", tmp_path / "raytmp"
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    assert main(["--grid", str(grid), "--output", str(out), "--num-cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "val.json: categories differ from" in err and "train.json" in err and "only in train: ids [9]" in err
    _no_mlflow_no_ray(out, ray_tmp)


def test_run_grid_data_check_passes_a_fixable_set_and_prints_its_counts(tmp_path, capsys):
    from orchestration.grid import expand, load_grid
    from orchestration.run_grid import _check_data

    (tmp_path / "val").mkdir()
    Image.new("L", (40, 30)).save(tmp_path / "val" / "11.png")
    s = _sets()
    del s["train"]["annotations"][0]["area"]
    grid = load_grid(_grid_file(tmp_path, _write(tmp_path, s)))
    _check_data(expand(grid, {}))
    out = capsys.readouterr().out
    assert "dataset real train: {" in out and "'filled_areas': 1" in out
    assert "dataset real val: {" in out and "'converted_images': 1" in out


def _broken_in_the_middle(path, w=40, h=30):
    """A PNG whose header and end marker are intact but whose pixel data is damaged: passes the header check."""
    buf = io.BytesIO()
    _noise(w, h, seed=3).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.find(b"IDAT") + 20
    data[start:start + 40] = bytes(b ^ 0x5A for b in data[start:start + 40])
    path.write_bytes(bytes(data))


def _real_set_with_fixes_and_an_undecodable_image(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 3  # 180°: the size stays
    _noise(40, 30).save(tmp_path / "train" / "1.jpg", exif=exif.tobytes())
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(tmp_path / "train" / "2.png")
    _broken_in_the_middle(tmp_path / "train" / "3.png")
    _broken_in_the_middle(tmp_path / "val" / "12.png")
    s = _sets()
    s["train"]["images"][0]["file_name"] = "1.jpg"
    s["train"]["images"].append(_img(4))
    s["train"]["annotations"].append(_ann(5, 4))
    paths = _write(tmp_path, s)
    assert not read_header(tmp_path / "train" / "3.png").problem  # the header check cannot see it
    return paths


def test_trainer_skips_and_counts_images_that_do_not_decode(tmp_path, make_config):
    paths = _real_set_with_fixes_and_an_undecodable_image(tmp_path)
    cfg = make_config(data={"synthetic": None, "name": "real", **paths, "max_unreadable_fraction": 0.5},
                      solver={"iter_scale": 0.00002, "checkpoint_period": 10**6}, log_period=1,
                      output_dir=str(tmp_path / "run"))
    rows = []
    metrics = train_loop(cfg, lambda m, c=None: rows.append(m))  # 2 iterations of 2 images: one epoch
    assert metrics["finished"] == 1 and metrics["iteration"] == 2
    assert metrics["data/unreadable_images"] == 1 and metrics["data/val_unreadable_images"] == 1
    assert metrics["data/exif_oriented_images"] == 1 and metrics["data/high_depth_images"] == 1
    assert metrics["data/images_kept"] == 4 and metrics["data/val_images"] == 2
    assert all("data/unreadable_images" in r for r in rows)


def test_train_cli_stops_with_a_named_error_past_the_unreadable_fraction(tmp_path, capsys):
    from lgd.train import main

    paths = _real_set_with_fixes_and_an_undecodable_image(tmp_path)
    cfg = {"backbone": "resnet18", "fpn_channels": 32, "device": "cpu", "output_dir": str(tmp_path / "run"),
           "data": {"name": "real", **paths, "max_unreadable_fraction": 0.0},
           "input": {"min_size": 64, "max_size": 64}, "lgd": {"num_heads": 4},
           "solver": {"iter_scale": 0.0001, "ims_per_batch": 4, "warmup_iters": 0}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.json: 1 of 4 images do not decode" in err and "image id 3" in err and "3.png" in err


def test_train_cli_refuses_a_defective_set_before_training(tmp_path, capsys):
    from lgd.train import main

    s = _sets()
    s["val"]["annotations"][0]["bbox"][0] = float("nan")
    paths = _write(tmp_path, s)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"backbone": "resnet18", "output_dir": str(tmp_path / "run"),
                                                       "data": {"name": "real", **paths}}))
    assert main([str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "val.json" in err and "annotation id 21" in err and "field 'bbox[0]'" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reader_without_a_prior_check_refuses_too(tmp_path):
    s = _sets()
    s["train"]["images"][1]["id"] = 1
    paths = _write(tmp_path, s)
    with pytest.raises(DataError, match="images: id 1 is used by 2 entries"):
        CocoDetection(paths["train_images"], paths["train_annotations"])
