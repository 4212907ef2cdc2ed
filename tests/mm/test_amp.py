"""agvm.mm.amp: bf16 features / boxes through mmcv's RoIAlign and nms (float32 detours)."""
import pytest
import torch

pytestmark = pytest.mark.mm
pytest.importorskip("mmdet")


def test_bf16_roi_extractor_and_nms_match_float32():
    import mmcv.ops
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

    from agvm.mm import register_all

    register_all()
    torch.manual_seed(0)
    ext = SingleRoIExtractor(roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0), out_channels=8,
                             featmap_strides=[4, 8])
    feats = (torch.randn(1, 8, 32, 48), torch.randn(1, 8, 16, 24))
    rois = torch.tensor([[0, 3.3, 5.1, 60.7, 90.2], [0, 10.0, 12.5, 150.1, 120.9]])
    ref = ext(feats, rois)
    out = ext(tuple(f.bfloat16() for f in feats), rois)  # mmcv's kernels alone raise for bf16
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.03)  # bf16 features, float32 RoIs

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = mmcv.ops.batched_nms(boxes.bfloat16(), scores.bfloat16(), torch.zeros(3, dtype=torch.long),
                                      dict(type="nms", iou_threshold=0.5))
    assert keep.tolist() == [0, 2]
