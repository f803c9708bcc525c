"""Evaluation of image-prompted generation: the paper's CLIP-I and CLIP-T (`clip_scores`), scoring a folder or
manifest of generated images (`items`, `scoring`, `report`) and the COCO2017 protocol of Table 1 (`coco`)."""
