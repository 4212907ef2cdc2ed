"""Tiny model / schedule overrides for the OpenMMLab pipeline tests (imported by the tests)."""

SIZE = 64


def _det_tiny(pipeline: str) -> dict:
    o = {
        "model.backbone.depth": 18,
        "model.backbone.init_cfg": None,
        "model.neck.in_channels": [64, 128, 256, 512],
    }
    if pipeline == "retinanet":  # after 4 steps the focal-loss prior (0.01) is below mmdet's 0.05
        o["model.test_cfg.score_thr"] = 0.001
    else:
        o.update({
            "model.train_cfg.rpn_proposal.nms_pre": 200,
            "model.train_cfg.rpn_proposal.max_per_img": 100,
            "model.train_cfg.rcnn.sampler.num": 64,
            "model.test_cfg.rpn.nms_pre": 200,
            "model.test_cfg.rpn.max_per_img": 50,
            "model.roi_head.bbox_head.fc_out_channels": 128,
            "model.test_cfg.rcnn.score_thr": 0.001,  # a 4-step model scores below mmdet's 0.05
        })
    return o


def tiny_options(pipeline: str, synthetic_root: str, **extra) -> dict:
    """cfg_options: synthetic data at 64 px, ResNet-18 backbone, few proposals, 2 epochs / 4 iterations."""
    o = {"dataset": "synthetic", "synthetic_root": synthetic_root, "synthetic_image_size": SIZE,
         "log_level": "WARNING", "default_hooks.logger.interval": 1, "optim_wrapper.optimizer.interval": 2}
    if pipeline == "semantic_fpn":
        o.update({"model.backbone.depth": 18, "model.backbone.init_cfg": None, "model.pretrained": None,
                  "model.neck.in_channels": [64, 128, 256, 512], "model.decode_head.channels": 32,
                  "train_cfg.max_iters": 4, "train_cfg.val_interval": 4, "default_hooks.checkpoint.interval": 2,
                  "param_scheduler": [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2),
                                      dict(type="PolyLR", power=0.9, eta_min=0.0, by_epoch=False, begin=0, end=4)]})
    else:
        o.update(_det_tiny(pipeline))
        o.update({"train_cfg.max_epochs": 2, "train_cfg.val_interval": 2,
                  "param_scheduler": [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2)]})
    o.update(extra)
    return o
