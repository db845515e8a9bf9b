"""COCO-format data: the dataset reader, the synthetic shapes generator and batching."""
