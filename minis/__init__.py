"""minis: image segmentation from FCN to CondInst, built from scratch in readable PyTorch.

Sub-packages (import the one you need, e.g. ``import minis.data``):

- :mod:`minis.data`    the synthetic *shapes* benchmark, COCO and labelme readers, transforms
- :mod:`minis.ops`     box and RoI operations in plain PyTorch
- :mod:`minis.nn`      backbones, FPN, losses shared by the architectures
- :mod:`minis.models`  one file per architecture and a registry to build them by name
- :mod:`minis.engine`  the one Trainer every model trains with
- :mod:`minis.eval`    COCO AP through pycocotools, mIoU for semantic segmentation
- :mod:`minis.viz`     overlays, colour maps and curves
"""

__version__ = "0.1.0"
