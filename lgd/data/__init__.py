"""COCO-format data: the pre-training check, image decoding, the reader, the synthetic generator, batching."""
