# RetinaNet with a ResNet-18 backbone (the 10k-batch stability experiment).
_base_ = './retinanet.py'
model = dict(
    backbone=dict(depth=18, init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet18')),
    neck=dict(in_channels=[64, 128, 256, 512]))
