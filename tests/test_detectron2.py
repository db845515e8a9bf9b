"""backend: detectron2 — detectron2's RetinaNet, Faster R-CNN and Mask R-CNN behind the seam: a short training run of
each (baseline and LGD) through the engine, its weights and options, a grid with a `backend` axis through
run_grid.py, and the exit-2 refusal of a grid that asks for detectron2 where it is not installed.

detectron2 is built from source (.ci/run installs it): without it these tests are skipped, except under CI=true,
where they fail naming the install command (CI must not silently skip the backend).
"""
import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from grids import ROOT, run_grid, tiny_grid, write_grid
from lgd.detectors.detectron2 import INSTALL, available

DETECTORS = ["retinanet", "faster_rcnn", "mask_rcnn"]
# R-CNN sampling sized for 64 px images (detectron2's defaults: 1000 proposals, 512 RoIs per image)
RCNN_OPTS = {"MODEL.RPN.POST_NMS_TOPK_TRAIN": 100, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32}


@pytest.fixture
def d2():
    """detectron2 is installed, else: fail under CI=true, skip elsewhere (both naming the install command)."""
    if available():
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and detectron2 is not installed (.ci/run installs it): {INSTALL}", pytrace=False)
    pytest.skip(f"detectron2 is not installed: {INSTALL}")


@pytest.fixture
def one_thread():
    """One intra-op thread for the in-process training runs (restored after): tiny convs gain nothing from two,
    and on a machine whose cores are shared two threads' OpenMP barriers cost ~20x (measured: 44 s vs 1.8 s for a
    4-iteration RetinaNet run under load 5 on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(make_config, detector, lgd, tmp_path=None, **over):
    return make_config(
        detector=detector, backend="detectron2", detector_options=RCNN_OPTS if "rcnn" in detector else {},
        # 4 iterations; distillation and the student's gradient from the start
        solver={"iter_scale": 4.2 / 90_000, "checkpoint_period": 90_000},
        lgd={"enabled": lgd, "segm_masks": lgd and detector == "mask_rcnn", "distill_start": 0,
             "freeze_backbone_iters": 0},
        log_period=1, max_eval_images=4, output_dir=str(tmp_path or "unused"), **over)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("lgd", [False, True], ids=["baseline", "lgd"])
def test_detector_trains_and_evaluates(d2, one_thread, make_config, tmp_path, detector, lgd):
    from lgd.engine import build_datasets, build_model, train_loop
    from lgd.data.coco import collate

    cfg = _config(make_config, detector, lgd, tmp_path)
    assert cfg.solver.max_iter == 4
    # one step by hand: every trainable parameter of the detector (and, with LGD, of the teacher) gets a gradient
    train, _ = build_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, train.num_classes)
    model.train()
    assert type(model.export()).__module__.startswith("detectron2.modeling")
    images, targets = collate([train[i] for i in range(2)])
    losses = model(images, targets, iteration=0)
    model.total_loss(losses).backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in named if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    trunk = [p for p in model.adapter.trunk().parameters() if p.requires_grad]
    assert trunk and any(p.grad.abs().sum() > 0 for p in trunk)
    assert any(n.startswith("teacher.") for n, _ in named) == lgd

    metrics = train_loop(cfg)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [r["iteration"] for r in history] == [1, 2, 3, 4]
    for row in history:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    terms = set(history[-1])
    student = {"loss_cls", "loss_box_reg"} | ({"loss_rpn_cls", "loss_rpn_loc"} if "rcnn" in detector else set()) | (
        {"loss_mask"} if detector == "mask_rcnn" else set())
    assert student <= terms
    if lgd:
        assert {f"{k}.tea" for k in student} | {"distill"} <= terms
    else:
        assert not any(k.endswith(".tea") for k in terms) and "distill" not in terms
    assert 0.0 <= metrics["bbox/AP"] <= 100.0 and metrics["finished"] == 1
    if detector == "mask_rcnn":
        assert 0.0 <= metrics["segm/AP"] <= 100.0
    saved = torch.load(tmp_path / "model_final.pt", weights_only=True)
    assert "backbone.bottom_up.stem.conv1.weight" in saved  # detectron2's own names: its checkpoints map 1:1
    assert not any(k.startswith(("teacher", "adaptation")) for k in saved)


@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
def test_unshared_teacher_head_trains_on_the_instructive_features(d2, one_thread, make_config, detector):
    """Table 6(b) on detectron2: the .tea losses go through the head copy, the student's head gets nothing from them."""
    from lgd.data.coco import collate
    from lgd.engine import build_datasets, build_model

    cfg = make_config(detector=detector, backend="detectron2", detector_options=RCNN_OPTS if "rcnn" in detector else {},
                      lgd={"enabled": True, "shared_head": False, "distill_start": 0})
    train, _ = build_datasets(cfg)
    model = build_model(cfg, train.num_classes)
    model.train()
    losses = model(*collate([train[i] for i in range(2)]), iteration=0)
    sum(v for k, v in losses.items() if k.endswith(".tea")).backward()
    grads = lambda m: [p.grad for p in m.parameters() if p.requires_grad]  # noqa: E731
    assert all(g is None or g.abs().sum() == 0 for g in grads(model.adapter.heads()))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(model.teacher_heads))


def test_weights_load_through_detectron2s_checkpointer(d2, one_thread, make_config, tmp_path):
    from lgd.engine import build_model

    scratch = build_model(_config(make_config, "retinanet", False), 3)
    trunk = scratch.adapter.trunk()
    assert type(trunk.stem.conv1.norm).__name__ == "BatchNorm2d"  # from scratch: BN, nothing frozen
    assert all(p.requires_grad for p in trunk.parameters())
    path = tmp_path / "r18.pth"
    torch.save({"model": scratch.export().state_dict()}, path)
    loaded = build_model(_config(make_config, "retinanet", False, weights=str(path)), 3)
    got = loaded.adapter.trunk().state_dict()
    for name, value in trunk.state_dict().items():  # conv weights and the BN statistics, now FrozenBN buffers
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(got[name], value, msg=name)
    assert type(loaded.adapter.trunk().stem.conv1.norm).__name__ == "FrozenBatchNorm2d"  # the zoo's, for its checkpoints
    assert not any(p.requires_grad for p in loaded.adapter.trunk().stem.parameters())  # FREEZE_AT 2
    with pytest.raises(ValueError, match="not a checkpoint of this backbone"):  # R-18 weights, R-50 model
        build_model(_config(make_config, "retinanet", False, weights=str(path), backbone="resnet50"), 3)
    with pytest.raises(ValueError, match="no such file"):
        build_model(_config(make_config, "retinanet", False, weights=str(tmp_path / "R-50.pkl")), 3)


def test_weights_folder_and_config_time_refusals(make_config, tmp_path):
    """A folder of detectron2's ImageNet checkpoints serves every backbone of a grid; a torchvision weights name
    or a backbone detectron2 lacks is refused when the config is read (no detectron2 needed for that)."""
    from lgd.detectors.detectron2.config import resolve_weights
    from lgd.typed import ConfigError

    (tmp_path / "R-101.pkl").write_bytes(b"")
    assert resolve_weights(str(tmp_path), "resnet101_dcn") == str(tmp_path / "R-101.pkl")
    assert resolve_weights(str(tmp_path / "R-101.pkl"), "resnet50") == str(tmp_path / "R-101.pkl")  # a file: as given
    with pytest.raises(FileNotFoundError, match="no R-50.pkl in that folder"):
        resolve_weights(str(tmp_path), "resnet50")
    with pytest.raises(ConfigError, match="weights: backend detectron2 takes detectron2's checkpoints"):
        _config(make_config, "retinanet", False, weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="backbone: backend detectron2 has ResNet/ResNeXt backbones"):
        _config(make_config, "faster_rcnn", False, backbone="swin_t")
    with pytest.raises(ConfigError, match="detector: backend detectron2 has retinanet, faster_rcnn, mask_rcnn"):
        _config(make_config, "fcos", False)


def test_detector_options_are_detectron2_config_keys(d2, make_config):
    from lgd.detectors.detectron2.config import build_config
    from lgd.typed import ConfigError

    cfg = build_config("retinanet", "resnext101_32x8d_dcn", 3, (640, 800), 1333, None, 256,
                       {"MODEL.RETINANET.NUM_CONVS": 2, "MODEL.RETINANET.FOCAL_LOSS_GAMMA": 3})
    r = cfg.MODEL.RESNETS
    assert (r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP, r.DEFORM_ON_PER_STAGE, r.DEFORM_MODULATED) == (
        101, 32, 8, [False, True, True, True], True)
    assert cfg.MODEL.RETINANET.NUM_CONVS == 2 and cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA == 3.0
    assert cfg.INPUT.MIN_SIZE_TRAIN == (640, 800) and cfg.INPUT.MIN_SIZE_TEST == 800
    with pytest.raises(ConfigError) as e:
        make_config(backend="detectron2", detector_options={
            "MODEL.RETINANET.NUM_CONVS": "four", "MODEL.RETINANET.NO_SUCH_KEY": 1, "MODEL.FPN.OUT_CHANNELS": 64,
            "SOLVER.BASE_LR": 0.1})
    text = str(e.value)
    for key in ("MODEL.RETINANET.NUM_CONVS", "MODEL.RETINANET.NO_SUCH_KEY", "MODEL.FPN.OUT_CHANNELS", "SOLVER.BASE_LR"):
        assert f"detector_options.{key}" in text, text
    assert "Type mismatch" in text and "fpn_channels" in text


BACKEND_TABLE = {"name": "backends", "dataset": "shapes", "rows": ["backend"], "columns": ["method"],
                 "grid": [{"backend": ["torchvision", "detectron2"], "detector": ["retinanet"], "method": ["lgd"]}]}


@pytest.mark.slow
def test_grid_with_a_backend_axis(d2, tmp_path):
    path = write_grid(tmp_path, tiny_grid("backends", [BACKEND_TABLE]))
    out = tmp_path / "out"
    r = run_grid(path, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("lgd-grid-backends")
    trials = [t for t in c.search_runs([exp.experiment_id]) if t.data.tags.get("lgd.kind") == "trial"]
    by_backend = {t.data.params["backend"]: t for t in trials}
    assert set(by_backend) == {"torchvision", "detectron2"}
    assert all(t.data.tags["lgd.state"] == "done" and "bbox/AP" in t.data.metrics for t in trials)
    assert {"loss_cls.tea", "distill"} <= set(by_backend["detectron2"].data.metrics)  # detectron2's loss names
    assert "classification.tea" in by_backend["torchvision"].data.metrics
    rows = list(csv.DictReader((out / "tables" / "backends.csv").open()))
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows)


def test_grid_asking_for_missing_detectron2_exits_2_before_anything(tmp_path):
    """An environment where detectron2 cannot be imported (a shim package that raises ImportError, first on the
    path): run_grid.py refuses the grid with the install command; no Ray, no MLflow store, no output folder."""
    shim = tmp_path / "shim" / "detectron2"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("detectron2 hidden by the test shim")\n')
    path = write_grid(tmp_path, tiny_grid("backends", [BACKEND_TABLE]))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(shim.parent), os.environ.get("PYTHONPATH"))
                                                         if p)}
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "orchestration" / "run_grid.py"), "--grid", str(path),
                        "--output", str(out), "--num-cpus", "2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 trial(s) of this grid use backend detectron2" in r.stderr
    assert "hidden by the test shim" in r.stderr  # the check imported detectron2 (the shim), it did not guess
    assert "pip install --no-build-isolation" in r.stderr and "detectron2-02b5c4e2.tar.gz" in r.stderr
    assert not out.exists() and not (Path(ROOT) / "runs" / "backends").exists()
    assert "Started a local Ray instance" not in r.stdout + r.stderr


def test_mask_codes_equal_detectron2_crop_and_resize(d2):
    """Table 10's descriptor: our 7 x 7 mask code is detectron2's BitMasks.crop_and_resize, as the reference's
    label encoder computes it, on random masks and boxes (some past the image's border, some smaller than a pixel)."""
    from detectron2.structures import BitMasks

    from lgd.objects import mask_codes

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 37, 53, generator=g) < torch.rand(40, 1, 1, generator=g)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([60.0, 44.0]) - 4
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 30 + 0.3], 1)
    expected = BitMasks(masks).crop_and_resize(boxes, 7).reshape(40, 49)
    assert torch.equal(mask_codes(masks.to(torch.uint8), boxes).bool(), expected)
