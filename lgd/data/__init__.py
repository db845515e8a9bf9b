"""Detection data: the pre-training check, image decoding, the readers (COCO, Pascal VOC, CrowdHuman), the synthetic
generator, batching."""
