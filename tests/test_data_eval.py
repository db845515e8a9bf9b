"""COCO-format reading (filters, clear errors) and COCO evaluation on hand-made detections."""
import json

import pytest
import torch
from PIL import Image

from lgd.data.coco import CocoDetection, DataError
from lgd.evaluation import coco_eval, detections_to_coco


def _write(tmp_path, images, annotations, categories=({"id": 5, "name": "a"}, {"id": 9, "name": "b"})):
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"])).save(img_dir / im["file_name"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return str(img_dir), str(ann)


def _img(i, w=40, h=30):
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def _ann(i, img, cat, bbox, crowd=0):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "iscrowd": crowd, "area": bbox[2] * bbox[3]}


def test_filters_are_applied_and_counted(tmp_path):
    anns = [_ann(1, 1, 5, [1, 1, 10, 10]), _ann(2, 1, 9, [5, 5, 0, 4]),  # degenerate
            _ann(3, 1, 9, [30, 20, 20, 20]),  # clipped to the image
            _ann(4, 2, 5, [1, 1, 5, 5], crowd=1)]  # image 2: crowd only
    anns += [_ann(10 + k, 4, 5, [k % 30, 1, 5, 5]) for k in range(500)]  # 500 objects
    d = CocoDetection(*_write(tmp_path, [_img(1), _img(2), _img(3), _img(4)], anns), max_objects=300)
    st = d.stats
    assert (st.images, st.images_kept, st.crowd_annotations, st.degenerate_boxes, st.clipped_boxes,
            st.truncated_objects, st.images_without_objects) == (4, 2, 1, 1, 1, 200, 2)
    img, t = d[0]
    assert img.shape == (3, 30, 40) and 0.0 <= img.min() and img.max() <= 1.0
    torch.testing.assert_close(t["boxes"], torch.tensor([[1.0, 1.0, 11.0, 11.0], [30.0, 20.0, 40.0, 30.0]]))
    assert t["labels"].tolist() == [1, 2] and d.label_to_cat == {1: 5, 2: 9}
    assert len(d[1][1]["boxes"]) == 300


def test_validation_split_keeps_images_without_objects(tmp_path):
    d = CocoDetection(*_write(tmp_path, [_img(1), _img(2)], [_ann(1, 1, 5, [1, 1, 10, 10])]), train=False)
    assert len(d) == 2 and len(d[1][1]["boxes"]) == 0


@pytest.mark.parametrize("problem, message", [
    ("unknown_category", "annotation id 7: unknown category id 3"),
    ("missing_image", "image id 2: file"),
    ("bad_json", "not valid JSON"),
    ("not_coco", "missing annotations"),
])
def test_bad_data_stops_with_a_message_naming_file_and_id(tmp_path, problem, message):
    images, anns = [_img(1), _img(2)], [_ann(7, 1, 3 if problem == "unknown_category" else 5, [1, 1, 5, 5])]
    img_dir, ann = _write(tmp_path, images, anns)
    if problem == "missing_image":
        (tmp_path / "img" / "2.png").unlink()
    if problem == "bad_json":
        (tmp_path / "ann.json").write_text('{"images": [')
    if problem == "not_coco":
        (tmp_path / "ann.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(DataError, match=message) as e:
        CocoDetection(img_dir, ann)
    assert "ann.json" in str(e.value)


def test_coco_eval_gives_known_ap(tmp_path):
    anns = [_ann(1, 1, 5, [2, 2, 10, 10]), _ann(2, 1, 5, [20, 10, 10, 10])]
    d = CocoDetection(*_write(tmp_path, [_img(1)], anns), train=False)
    perfect = [{"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0], [20.0, 10.0, 30.0, 20.0]]),
                "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}]
    boxes, _ = detections_to_coco(perfect, [1], d.label_to_cat)
    assert boxes[0]["category_id"] == 5 and boxes[0]["bbox"] == [2.0, 2.0, 10.0, 10.0]
    assert coco_eval(d.coco, boxes, "bbox")["AP"] == pytest.approx(100.0)
    half = [{k: v[:1] for k, v in perfect[0].items()}]  # one of two objects found: recall 0.5
    boxes, _ = detections_to_coco(half, [1], d.label_to_cat)
    assert coco_eval(d.coco, boxes, "bbox")["AP"] == pytest.approx(100 * 51 / 101, abs=0.01)
    wrong_class = [{**perfect[0], "labels": torch.tensor([2, 2])}]
    boxes, _ = detections_to_coco(wrong_class, [1], d.label_to_cat)
    assert coco_eval(d.coco, boxes, "bbox")["AP"] == 0.0
    assert coco_eval(d.coco, [], "bbox")["AP50"] == 0.0
