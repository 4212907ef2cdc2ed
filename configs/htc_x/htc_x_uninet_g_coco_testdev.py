"""COCO test-dev detections of the stage-3 model (the paper's 62.2 box / 53.4 mask AP are test-dev numbers).

test-dev has no public labels: the evaluation server (https://cocodataset.org, "Detection" upload) scores a
results file. This config runs the test set over test2017/ with annotations/image_info_test-dev2017.json and
writes COCO results files instead of metrics (mmdet's CocoMetric with format_only):

    python -m agvm.mm.evaluate configs/htc_x/htc_x_uninet_g_coco_testdev.py work_dirs/htc_x_uninet_g_coco/epoch_11.pth \
        --results-file work_dirs/htc_x_uninet_g_coco_testdev/detections_test-dev2017_agvm
    -> <prefix>.bbox.json and <prefix>.segm.json; rename them detections_test-dev2017_<name>_results.json /
       detections_test-dev2017_<name>_results.json (segm) and zip each for the server.

Data: $AGVM_COCO_ROOT/test2017/ and $AGVM_COCO_ROOT/annotations/image_info_test-dev2017.json (from
http://images.cocodataset.org/annotations/image_info_test2017.zip).
"""
_base_ = ["./htc_x_uninet_g_coco.py"]

data_root = "{{$AGVM_COCO_ROOT:data/coco/}}"
test_dataloader = dict(
    dataset=dict(ann_file="annotations/image_info_test-dev2017.json", data_prefix=dict(img="test2017/")))
test_evaluator = dict(
    type="CocoMetric", ann_file=data_root + "annotations/image_info_test-dev2017.json", metric=["bbox", "segm"],
    format_only=True, outfile_prefix="work_dirs/htc_x_uninet_g_coco_testdev/detections_test-dev2017")
