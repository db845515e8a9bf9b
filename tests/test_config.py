import pytest

from lgd.config import config_from_dict, load_config
from lgd.typed import ConfigError


def test_unknown_keys_and_bad_values_are_all_reported_with_paths():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"detectr": "fcos", "solver": {"base_lr": "fast", "shedule": "1x"},
                          "lgd": {"distill_weight": -1.0}, "backbone": "resnet7"})
    probs = "\n".join(e.value.problems)
    assert "detectr: unknown key (did you mean 'detector'?)" in probs
    assert "solver.shedule: unknown key" in probs
    assert "solver.base_lr: expected a number" in probs
    assert "lgd.distill_weight: λ must be >= 0" in probs
    assert len(e.value.problems) == 4  # backbone is checked once the types are right


def test_detector_defaults_and_overrides(make_config):
    retina = make_config(detector="retinanet")
    frcn = make_config(detector="faster_rcnn")
    assert retina.use_context and not retina.detach_appearance
    assert not frcn.use_context and frcn.detach_appearance
    assert frcn.mapper_inputs == "objects" and retina.mapper_inputs == "both"
    cfg = config_from_dict({}, ["lgd.enabled=true", "solver.schedule=2x", "solver.iter_scale=0.001"])
    assert cfg.lgd.enabled and cfg.solver.max_iter == 180 and cfg.solver.milestones == (120, 160)


def test_context_ablation_needs_context():
    with pytest.raises(ConfigError, match="lgd.mapper_inputs"):
        config_from_dict({"detector": "faster_rcnn", "lgd": {"mapper_inputs": "both"}})


def test_detector_options_are_checked_against_torchvision():
    with pytest.raises(ConfigError, match="detector_options.box_batch_size_per_image"):
        config_from_dict({"detector": "retinanet", "detector_options": {"box_batch_size_per_image": 4}})
    cfg = config_from_dict({"detector": "faster_rcnn", "detector_options": {"box_batch_size_per_image": 4}})
    assert cfg.detector_options == {"box_batch_size_per_image": 4}


def test_digest_tracks_what_is_trained_only(make_config):
    a = make_config()
    assert a.digest() == make_config(output_dir="elsewhere", log_period=7, channels_last=True).digest()
    assert a.digest() == make_config(data={"max_unreadable_fraction": 0.01, "loader_workers": 2}).digest()
    # a baseline trains the same whatever its LGD settings; an LGD trial does not
    assert a.digest() == make_config(lgd={"distill_weight": 2.0}).digest()
    lgd = make_config(lgd={"enabled": True})
    assert lgd.digest() != a.digest()
    assert lgd.digest() != make_config(lgd={"enabled": True, "distill_weight": 2.0}).digest()
    assert lgd.digest() != make_config(lgd={"enabled": True, "image_level_tnet": True}).digest()
    assert a.digest() != make_config(solver={"amp": "bf16"}).digest()
    b = config_from_dict({"data": {"name": "coco", "train_images": "/a", "train_annotations": "/a.json",
                                   "val_images": "/b", "val_annotations": "/b.json", "synthetic": None}})
    c = config_from_dict({"data": {"name": "coco", "train_images": "/x", "train_annotations": "/x.json",
                                   "val_images": "/y", "val_annotations": "/y.json", "synthetic": None}})
    assert b.digest() == c.digest()  # moving a dataset does not make its trials new


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("detector: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_optimizer_choice_defaults_and_digest(make_config):
    """solver.optimizer / lgd.optimizer.optimizer: sgd | adamw; a left-out lr and decay are the optimizer's
    own (AdamW: the Swin detection recipe); the digest tells the optimizers apart, not a default spelt out."""
    sgd = config_from_dict({})
    assert sgd.solver.settings() == {"optimizer": "sgd", "base_lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    adamw = config_from_dict({"solver": {"optimizer": "adamw"}, "lgd": {"optimizer": {"optimizer": "adamw"}}})
    assert adamw.solver.settings()["base_lr"] == 1e-4 and adamw.lgd.optimizer.settings()["weight_decay"] == 0.05
    assert sgd.digest() == config_from_dict({"solver": {"base_lr": 0.01, "weight_decay": 1e-4}}).digest()
    assert adamw.digest() != sgd.digest()
    assert adamw.digest() == config_from_dict({"solver": {"optimizer": "adamw", "base_lr": 1e-4}}).digest()
    lgd = make_config(lgd={"enabled": True})
    assert lgd.digest() != make_config(lgd={"enabled": True, "optimizer": {"optimizer": "adamw"}}).digest()
    with pytest.raises(ConfigError) as e:
        config_from_dict({"solver": {"optimizer": "adam"}, "lgd": {"optimizer": {"base_lr": -1.0}}})
    assert "solver.optimizer: 'adam' is not one of 'sgd', 'adamw'" in e.value.problems
    assert "lgd.optimizer.base_lr: must be > 0" in e.value.problems


def test_new_students_are_known_and_their_options_checked():
    cfg = config_from_dict({"detector": "poto", "backbone": "swin_t", "detector_options": {"alpha": 0.5}})
    assert cfg.use_context and not cfg.detach_appearance  # the dense detectors' LGD settings
    config_from_dict({"detector": "atss", "detector_options": {"topk": 7, "score_thresh": 0.1}})
    with pytest.raises(ConfigError, match="detector_options.alpha"):
        config_from_dict({"detector": "atss", "detector_options": {"alpha": 0.5}})


def test_strict_types_yaml_switches_and_rules_beside_type_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("solver: {amp: off, base_lr: 1}\nlgd:\n")  # YAML 1.1: a bare off is false; an empty section
    cfg = load_config(p)
    assert cfg.solver.amp == "off" and cfg.solver.base_lr == 1.0 and isinstance(cfg.solver.base_lr, float)
    with pytest.raises(ConfigError) as e:
        config_from_dict({"seed": True, "fpn_channels": 256.0, "solver": {"iter_scale": "0.1", "amp": True},
                          "input": {"min_size": 8, "multi_scale": 1}, "lgd": {"num_heads": 0, "zz": 1},
                          "data": {"synthetic": {"num_train": 0}}})
    assert sorted(e.value.problems) == [
        "data.synthetic.num_train: must be >= 1",  # nested rules run beside the type errors elsewhere
        "fpn_channels: expected an integer, got 256.0",
        "input.multi_scale: expected true/false, got 1",
        "lgd.num_heads: must be >= 1",  # an unknown key leaves the section's values typed: its rules run
        "lgd.zz: unknown key; allowed: " + ", ".join(f for f in LGD_KEYS),
        "seed: expected an integer, got True",
        "solver.amp: True is not one of 'off', 'bf16', 'fp16'",
        "solver.iter_scale: expected a number, got '0.1'",
    ]
    with pytest.raises(ConfigError) as e:  # only rules and unknown keys below: the trial's own rules run too
        config_from_dict({"lgd": {"num_heads": 0, "zz": 1}, "eval_teacher": True, "data": {"synthetic": {"seed": "x"}},
                          "backbone": "resnet7"}, ["data.synthetic.seed=1"])
    assert [p.split(":")[0] for p in sorted(e.value.problems)] == ["backbone", "eval_teacher", "lgd.num_heads",
                                                                   "lgd.zz"]


LGD_KEYS = ("enabled", "label_encoder", "label_norm", "appearance_pooling", "detach_appearance", "use_context",
            "segm_masks", "attention_query", "mapper_inputs", "shared_head", "num_heads", "image_level_tnet",
            "masks_cover_touched_cells", "context_box_per_image", "distill_weight", "distill_start",
            "distill_stop_before_end", "freeze_backbone_iters", "freeze_scope", "optimizer")
