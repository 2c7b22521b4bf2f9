"""Box and RoI operations in plain, vectorised PyTorch with ``torchvision.ops`` signatures.

They arrive with the detection chapters (IoU, box coding, anchors, NMS, RoIPool, RoIAlign),
each tested equal to torchvision's compiled kernel.
"""
