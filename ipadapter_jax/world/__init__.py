"""The shapes world: a small, offline world where an IP-Adapter's learning is visible and measurable exactly.

- `scenes`: procedural 32 x 32 scenes (a circle, square or triangle of one of 8 colours on a background of
  another, in one of 4 quadrants) with template captions that name only the shape (`describe` names
  the other attributes too, for the base's training);
- `reader`: an exact NumPy attribute reader, and the toy CLIP-I (image-only attributes shared with the image
  prompt) and toy CLIP-T (the caption's shape);
- `vae`: a diffusers VAE set by hand to reconstruct every scene exactly;
- `base_training`: the base text-to-image UNet's training (this world only);
- `build`: the world's diffusers pipeline folder and CLIP image encoder; `inputs`: the `world` placeholders
  of `train/world_adapter.yaml`; `evaluate`: generation with the image prompt vs text only, read back;
- `assets`: the shipped trained base UNet and adapter, and the command that regenerates them.
"""
