"""Pascal VOC and CrowdHuman: the readers on small sets written here in the real formats (XML devkit, .odgt), their
errors, the config keys, and the two metrics on hand-made cases whose values are computed by hand below."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lgd.config import config_from_dict
from lgd.data.check import DataError
from lgd.data.crowdhuman import load_crowdhuman, load_crowdhuman_split
from lgd.data.formats import load_splits
from lgd.data.voc import load_voc, load_voc_split
from lgd.evaluation import crowdhuman, evaluate, score, voc
from lgd.typed import ConfigError

CLASSES = ("cat", "dog")


def _jpeg(path: Path, w: int = 64, h: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (40, 40, 40)).save(path)


def _xml(objects, w=64, h=48) -> str:
    """VOC XML; objects: (name, x1, y1, x2, y2, difficult) in continuous coordinates (written 1-based inclusive)."""
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1 + 1:g}</xmin><ymin>{y1 + 1:g}</ymin><xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox>"
        f"</object>" for n, x1, y1, x2, y2, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def _devkit(root: Path, sets: dict) -> Path:
    """sets: {"VOC2007/test": {image id: [objects]}} written as a devkit under root."""
    for s, images in sets.items():
        folder, split = s.split("/")
        listing = root / folder / "ImageSets" / "Main" / f"{split}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        with open(listing, "a") as f:
            f.write("".join(f"{i}\n" for i in images))
        for i, objects in images.items():
            _jpeg(root / folder / "JPEGImages" / f"{i}.jpg")
            (root / folder / "Annotations").mkdir(parents=True, exist_ok=True)
            (root / folder / "Annotations" / f"{i}.xml").write_text(_xml(objects))
    return root


def _odgt(root: Path, split: str, records: list) -> Path:
    """records: (ID, [(tag, [x, y, w, h], ignore)]) written as one .odgt line each, with their images."""
    lines = []
    for rid, boxes in records:
        _jpeg(root / "Images" / f"{rid}.jpg")
        lines.append(json.dumps({"ID": rid, "gtboxes": [
            {"tag": tag, "hbox": [x, y, w / 2, h / 5], "head_attr": {"ignore": 0, "occ": 0, "unsure": 0},
             "fbox": [x, y, w, h], "vbox": [x, y, w, h], "extra": {"box_id": k, "occ": 0, "ignore": ign}}
            for k, (tag, (x, y, w, h), ign) in enumerate(boxes)]}))
    (root / f"annotation_{split}.odgt").write_text("\n".join(lines) + "\n")
    return root


def _out(*dets):
    """One image's torchvision output from (label, x1, y1, x2, y2, score) tuples."""
    a = np.array(dets, dtype=np.float32).reshape(-1, 6)
    return {"boxes": torch.from_numpy(a[:, 1:5]), "labels": torch.from_numpy(a[:, 0]).long(),
            "scores": torch.from_numpy(a[:, 5])}


# --- Pascal VOC ------------------------------------------------------------------------------------------------
def test_voc_reader_reads_the_devkit_union_and_keeps_difficult_objects_out_of_training(tmp_path):
    root = _devkit(tmp_path / "VOCdevkit", {
        "VOC2007/trainval": {"000005": [("cat", 0, 0, 10, 10, 0), ("dog", 20, 10, 40, 30, 1)]},
        "VOC2012/trainval": {"2008_000001": [("dog", 5, 5, 25, 35, 0)], "2008_000002": [("cat", 1, 1, 9, 9, 1)]},
        "VOC2007/test": {"000001": [("dog", 2, 3, 30, 40, 0)]}})
    train, val = load_voc(root, classes=CLASSES)
    assert (train.format, val.format) == ("voc", "voc") and train.class_names == list(CLASSES)
    assert len(train) == 2 and train.stats.images == 3 and train.stats.crowd_annotations == 2  # only-difficult: out
    _, t = train[0]
    assert t["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]] and t["labels"].tolist() == [1]  # 1-based -> continuous
    _, t = train[1]
    assert t["boxes"].tolist() == [[5.0, 5.0, 25.0, 35.0]] and t["labels"].tolist() == [2]
    assert train.coco.imgs[2]["file_name"] == "VOC2012/JPEGImages/2008_000001.jpg"
    assert len(val) == 1 and val[0][1]["boxes"].tolist() == [[2.0, 3.0, 30.0, 40.0]]


def test_voc_reader_errors_name_the_file_and_object_or_line(tmp_path):
    root = _devkit(tmp_path / "a", {"VOC2007/test": {"000001": [("cat", 0, 0, 10, 10, 0), ("horse", 1, 1, 5, 5, 0)]}})
    with pytest.raises(DataError, match=r"000001\.xml: object 1 \(horse\): <name> 'horse' is not one of the classes"):
        load_voc_split(root, ["VOC2007/test"], False, CLASSES)
    root = _devkit(tmp_path / "b", {"VOC2007/test": {"000001": [("cat", 0, 0, 10, 10, 0)]}})
    (root / "VOC2007/ImageSets/Main/test.txt").write_text("000001\n000002\n")
    with pytest.raises(DataError, match=r"test\.txt: line 2: annotation file .*000002\.xml not found"):
        load_voc_split(root, ["VOC2007/test"], False, CLASSES)
    (root / "VOC2007/ImageSets/Main/test.txt").write_text("000001\n")
    xml = root / "VOC2007/Annotations/000001.xml"
    xml.write_text(xml.read_text().replace("<xmax>10</xmax>", "<xmax>ten</xmax>"))
    with pytest.raises(DataError, match=r"000001\.xml: object 0 \(cat\): <bndbox><xmax>: expected a number, got 'ten'"):
        load_voc_split(root, ["VOC2007/test"], False, CLASSES)
    xml.write_text(_xml([("cat", 0, 0, 10, 10, 0)], w=50))  # the JPEG is 64 wide
    with pytest.raises(DataError, match=r"000001\.jpg is 64x48 .* but the JSON says 50x48"):
        load_voc_split(root, ["VOC2007/test"], False, CLASSES)
    with pytest.raises(DataError, match=r"VOC2012.*test\.txt: image set list not found"):
        load_voc_split(root, ["VOC2012/test"], False, CLASSES)


@pytest.fixture
def voc_val(tmp_path):
    """Two classes over three images: cat boxes A (img 0), B (img 1), C (img 2), a difficult cat D (img 2) and a
    dog E (img 0)."""
    return load_voc_split(_devkit(tmp_path / "VOCdevkit", {"VOC2007/test": {
        "im0": [("cat", 0, 0, 20, 20, 0), ("dog", 30, 10, 60, 40, 0)],
        "im1": [("cat", 10, 10, 40, 40, 0)],
        "im2": [("cat", 0, 0, 30, 30, 0), ("cat", 40, 20, 60, 45, 1)]}}), ["VOC2007/test"], False, CLASSES)


def test_voc_perfect_detector_scores_100(voc_val):
    outs = [_out((1, 0, 0, 20, 20, .9), (2, 30, 10, 60, 40, .8)), _out((1, 10, 10, 40, 40, .7)),
            _out((1, 0, 0, 30, 30, .6))]
    m = voc.score(voc_val, outs, [1, 2, 3])
    for k in (*voc.MEANS, "voc/AP50/cat", "voc/AP/dog"):
        assert m[k] == pytest.approx(100.0), k


def test_voc_false_positive_and_a_miss_give_the_hand_computed_ap_in_both_variants(voc_val):
    # cat, in score order: TP on A (0.9), FP far from any box (0.8), TP on B (0.7); C missed: 3 positives.
    # recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3. Area (VOC2010+): 1/3 * 1 + 1/3 * 2/3 = 5/9.
    # 11-point (VOC2007): recall >= 0, .1, .2, .3 -> 1; >= .4, .5, .6 -> 2/3; >= .7 ... 1 -> 0: (4 + 2) / 11.
    outs = [_out((1, 0, 0, 20, 20, .9), (1, 44, 0, 64, 8, .8), (2, 30, 10, 60, 40, .5)),
            _out((1, 10, 10, 40, 40, .7)), _out()]
    m = voc.score(voc_val, outs, [1, 2, 3])
    assert m["voc/AP50/cat"] == pytest.approx(100 * 5 / 9)
    assert m["voc/AP50_07"] == pytest.approx(100 * (6 / 11 + 1) / 2)  # the mean over cat and the perfect dog
    assert m["voc/AP50"] == pytest.approx(100 * (5 / 9 + 1) / 2)


def test_voc_difficult_objects_are_neither_found_nor_missed(voc_val):
    perfect = [_out((1, 0, 0, 20, 20, .9), (2, 30, 10, 60, 40, .8)), _out((1, 10, 10, 40, 40, .7)),
               _out((1, 0, 0, 30, 30, .6))]
    # the difficult cat D is missed: still 100; a top-scored detection on D is no false positive: still 100
    on_d = perfect[:2] + [_out((1, 40, 20, 60, 45, .95), (1, 0, 0, 30, 30, .6))]
    assert voc.score(voc_val, on_d, [1, 2, 3])["voc/AP50/cat"] == pytest.approx(100.0)
    # a second detection on A (IoU 0.9) is a duplicate: the first in score order (0.95) is the true positive, the
    # one at 0.9 a false positive. Precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1; the envelope is 1 up to
    # recall 1/3, then 3/4: AP = 1/3 + 2/3 * 3/4 = 5/6
    dup = [_out((1, 0, 0, 20, 20, .9), (1, 1, 1, 20, 20, .95), (2, 30, 10, 60, 40, .8))] + perfect[1:]
    assert voc.score(voc_val, dup, [1, 2, 3])["voc/AP50/cat"] == pytest.approx(100 * 5 / 6)


def test_voc_ap75_and_ap_over_thresholds(voc_val):
    # dog E (30,10)-(60,40), 900 px²; detection (30,10)-(60,31.6): IoU 648/900 = 0.72 -> a hit at IoU 0.50..0.70
    # (5 thresholds), a miss at 0.75..0.95: dog AP50 100, AP75 0, AP 50; cat perfect.
    outs = [_out((1, 0, 0, 20, 20, .9), (2, 30, 10, 60, 31.6, .8)), _out((1, 10, 10, 40, 40, .7)),
            _out((1, 0, 0, 30, 30, .6))]
    m = voc.score(voc_val, outs, [1, 2, 3])
    assert (m["voc/AP50/dog"], m["voc/AP75/dog"], m["voc/AP/dog"]) == pytest.approx((100.0, 0.0, 50.0))
    assert m["voc/AP"] == pytest.approx(75.0) and m["voc/AP75"] == pytest.approx(50.0)
    assert m["voc/AP_07"] == pytest.approx(75.0) and m["voc/AP75_07"] == pytest.approx(50.0)
    assert voc.score(voc_val, [_out(), _out(), _out()], [1, 2, 3])["voc/AP50"] == 0.0


# --- CrowdHuman --------------------------------------------------------------------------------------------------
def test_crowdhuman_reader_takes_full_boxes_and_turns_mask_and_ignore_into_ignore_regions(tmp_path):
    root = _odgt(tmp_path / "ch", "train", [
        ("273271,c9db000d5146c15", [("person", [1, 2, 20, 30], 0), ("mask", [30, 0, 30, 20], 0),
                                    ("person", [40, 20, 30, 40], 1)]),
        ("273271,only_ignored", [("mask", [0, 0, 10, 10], 0)])])
    _odgt(root, "val", [("v1", [("person", [5, 5, 10, 10], 0)])])
    train, val = load_crowdhuman(root)
    assert train.format == "crowdhuman" and train.class_names == ["person"] and len(train) == 1
    assert train.stats.crowd_annotations == 3 and train.stats.images_without_objects == 1
    _, t = train[0]
    assert t["boxes"].tolist() == [[1.0, 2.0, 21.0, 32.0]] and t["labels"].tolist() == [1]
    assert train.coco.imgs[1]["width"] == 64 and train.coco.imgs[1]["height"] == 48  # from the image header
    assert len(val) == 1


def test_crowdhuman_reader_errors_name_the_line(tmp_path):
    root = _odgt(tmp_path / "ch", "val", [("a", [("person", [1, 2, 20, 30], 0)])])
    odgt = root / "annotation_val.odgt"
    good = odgt.read_text()
    odgt.write_text(good + '{"ID": "b", "gtboxes": [}\n')
    with pytest.raises(DataError, match=r"annotation_val\.odgt: line 2: not valid JSON"):
        load_crowdhuman_split(root, "val")
    odgt.write_text(good + json.dumps({"ID": "b", "gtboxes": [{"tag": "person", "fbox": [1, 2, 3]}]}) + "\n")
    with pytest.raises(DataError, match=r"line 2 \(ID b\): field gtboxes\[0\]\.fbox: .*at least 4"):
        load_crowdhuman_split(root, "val")
    odgt.write_text(good + "\n" + good)
    with pytest.raises(DataError, match=r"line 3: ID a is used again \(first on line 1\)"):
        load_crowdhuman_split(root, "val")
    odgt.write_text(good + json.dumps({"ID": "nofile", "gtboxes": []}) + "\n")
    with pytest.raises(DataError, match=r"image id 2: file .*nofile\.jpg not found"):
        load_crowdhuman_split(root, "val")


@pytest.fixture
def crowd_val(tmp_path):
    """8 images; persons P0..P3 in images 0..3; an ignore region (mask tag) in image 4."""
    records = [(f"im{i}", [("person", [4 * i, 4, 16, 32], 0)]) for i in range(4)]
    records += [("im4", [("mask", [0, 0, 40, 40], 0)])] + [(f"im{i}", []) for i in range(5, 8)]
    return load_crowdhuman_split(_odgt(tmp_path / "ch", "val", records), "val")


def _p(i, s):  # a detection exactly on person i
    return (1, 4 * i, 4, 4 * i + 16, 36, s)


def test_crowdhuman_perfect_detector(crowd_val):
    outs = [_out(_p(i, .9 - i / 10)) for i in range(4)] + [_out() for _ in range(4)]
    m = crowdhuman.score(crowd_val, outs, list(range(1, 9)))
    # the toolkit's AP starts at the first detection's point (1/4, 1): the area to (1, 1) is 3/4, not 1
    assert m == pytest.approx({"crowdhuman/AP": 75.0, "crowdhuman/recall": 100.0, "crowdhuman/mMR": 0.0})


def test_crowdhuman_one_false_positive_at_known_fppi(crowd_val):
    # TP on P0 (0.9), FP in image 5 (0.8), TP on P1 (0.7); P2, P3 missed. Over 8 images the FP is at FPPI 1/8:
    # miss rate 3/4 until then, 1/2 after the second TP. The 9 FPPI points 10^(-2 .. 0): 0.01, 0.018, 0.032, 0.056,
    # 0.1 reach FPPI 1/8 first at the FP (miss rate 3/4); 0.18, 0.32, 0.56, 1 are never reached: the curve's last
    # point (1/2). mMR = exp((5 ln 3/4 + 4 ln 1/2) / 9). (The toolkit's rounded points 0.0100 .. 1.000 read the same.)
    outs = [_out(_p(0, .9)), _out(_p(1, .7))] + [_out() for _ in range(3)] + [_out((1, 40, 0, 60, 30, .8))] + \
        [_out(), _out()]
    m = crowdhuman.score(crowd_val, outs, list(range(1, 9)))
    assert m["crowdhuman/mMR"] == pytest.approx(100 * math.exp((5 * math.log(.75) + 4 * math.log(.5)) / 9))
    # precision-recall (r, p) from the first detection, as the toolkit: (1/4, 1) -> (1/4, 1/2) -> (1/2, 2/3);
    # trapezoids: 0 + 1/4 * (1/2 + 2/3) / 2
    assert m["crowdhuman/AP"] == pytest.approx(100 * 0.25 * (0.5 + 2 / 3) / 2)
    assert m["crowdhuman/recall"] == pytest.approx(50.0)


def test_crowdhuman_ignore_region_absorbs_detections_by_intersection_over_detection(crowd_val):
    base = [_out(_p(i, .9 - i / 10)) for i in range(4)]
    # inside the 40x40 ignore region of image 4 (IoU 0.25 with it, but all of the detection covered): left out
    inside = base + [_out((1, 10, 10, 30, 30, .95))] + [_out() for _ in range(3)]
    assert crowdhuman.score(crowd_val, inside, list(range(1, 9)))["crowdhuman/mMR"] == pytest.approx(0.0)
    # a third of it on the region (IoA 200/600 < 0.5): a false positive, above every person. Precision-recall
    # (0, 0) -> (1/4, 1/2) -> (1/2, 2/3) -> (3/4, 3/4) -> (1, 4/5); all persons found: mMR 0.
    partly = base + [_out((1, 30, 0, 60, 20, .95))] + [_out() for _ in range(3)]
    m = crowdhuman.score(crowd_val, partly, list(range(1, 9)))
    p = [0, 1 / 2, 2 / 3, 3 / 4, 4 / 5]
    assert m["crowdhuman/AP"] == pytest.approx(100 * sum(0.25 * (a + b) / 2 for a, b in zip(p, p[1:])))
    assert m["crowdhuman/mMR"] == 0.0 and m["crowdhuman/recall"] == pytest.approx(100.0)
    # TP P0 (0.9), TP P2 (0.7), that FP (0.5), TP P1 (0.05); P3 missed: miss rate 1/2 where FPPI reaches 1/8 (the
    # points up to 0.1), 1/4 at the end (the 4 points beyond): mMR = exp((5 ln 1/2 + 4 ln 1/4) / 9) = 2^(-13/9)
    late = [base[0], _out(_p(1, .05)), base[2], _out(), _out((1, 30, 0, 60, 20, .5))] + [_out() for _ in range(3)]
    assert crowdhuman.score(crowd_val, late, list(range(1, 9)))["crowdhuman/mMR"] == pytest.approx(100 * 2 ** (-13 / 9))
    none = crowdhuman.score(crowd_val, [_out() for _ in range(8)], list(range(1, 9)))
    assert none == {"crowdhuman/AP": 0.0, "crowdhuman/recall": 0.0, "crowdhuman/mMR": 100.0}


# --- config, dispatch, evaluation through the engine's path ------------------------------------------------------
def test_data_format_keys_are_validated(make_config):
    with pytest.raises(ConfigError) as e:
        make_config(data={"format": "voc", "train_images": "/x"})
    assert "data.train_images: format voc reads its own layout under 'root'" in str(e.value)
    with pytest.raises(ConfigError, match=r"data: format crowdhuman: give either 'root'"):
        config_from_dict({"data": {"format": "crowdhuman"}})
    with pytest.raises(ConfigError, match=r"data.root: format coco takes train_images"):
        config_from_dict({"data": {"root": "/x", "train_images": "a", "train_annotations": "b", "val_images": "c",
                                   "val_annotations": "d"}})
    with pytest.raises(ConfigError, match=r"data.train_sets: only format voc has image sets"):
        make_config(data={"format": "crowdhuman", "train_sets": ["VOC2007/trainval"]})
    with pytest.raises(ConfigError, match=r"data.val_sets: 'test': expected <folder>/<split>"):
        make_config(data={"format": "voc", "val_sets": ["test"]})
    with pytest.raises(ConfigError, match=r"data.format: 'kitti' is not one of 'coco', 'voc', 'crowdhuman'"):
        make_config(data={"format": "kitti"})
    with pytest.raises(ConfigError, match=r"detector: mask_rcnn needs instance masks"):
        make_config(detector="mask_rcnn", data={"format": "voc"})
    coco, voc_cfg = make_config(), make_config(data={"format": "voc"})
    assert coco.digest() != voc_cfg.digest()  # the format is part of what is trained, the root is not
    assert make_config(data={"format": "voc", "synthetic": None, "root": "/a"}).digest() == \
        make_config(data={"format": "voc", "synthetic": None, "root": "/b"}).digest()
    assert make_config(data={"format": "voc", "val_sets": ["VOC2007/test"]}).digest() != voc_cfg.digest()


def test_synthetic_copies_read_back_with_the_same_boxes_and_score_through_evaluate(make_config):
    coco_train, coco_val = load_splits(make_config().data)
    voc_train, voc_val = load_splits(make_config(data={"format": "voc"}).data)
    ch_train, ch_val = load_splits(make_config(data={"format": "crowdhuman"}).data)
    assert len(voc_train) == len(ch_train) == len(coco_train) and len(voc_val) == len(coco_val)
    for i in range(len(coco_val)):  # VOC's integer corners: within a pixel of the originals; CrowdHuman's: 0.1 px
        b = coco_val.records[i][4]
        assert np.allclose(voc_val.records[i][4], b, atol=1.01) and np.allclose(ch_val.records[i][4], b, atol=0.11)
        assert voc_val.records[i][5] == coco_val.records[i][5]
    assert voc_val.stats.crowd_annotations == coco_val.stats.crowd_annotations == ch_val.stats.crowd_annotations
    # the ground truth itself as detections: a perfect score by each protocol, through evaluate()
    truth = {int(r[0]): r for r in voc_val.records}
    oracle = lambda ims, tg: [_out(*[(lab, *box, 1.0) for box, lab in zip(truth[t["image_id"]][4],  # noqa: E731
                                                                             truth[t["image_id"]][5])]) for t in tg]
    m = evaluate(oracle, voc_val, torch.device("cpu"))
    assert m["voc/AP50"] == pytest.approx(100.0) and m["data/val_unreadable_images"] == 0
    truth = {int(r[0]): r for r in ch_val.records}
    oracle = lambda ims, tg: [_out(*[(1, *box, 1.0) for box in truth[t["image_id"]][4]]) for t in tg]  # noqa: E731
    m = evaluate(oracle, ch_val, torch.device("cpu"))
    assert m["crowdhuman/mMR"] == pytest.approx(0.0) and m["crowdhuman/recall"] == pytest.approx(100.0)
    assert set(score(coco_val, [], [])) >= {"bbox/AP", "bbox/AP50"}
