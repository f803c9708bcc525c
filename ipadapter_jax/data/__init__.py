"""Training data: TFDS builders, Grain input pipelines, image/caption transforms.

- ``sources``: the official JSON list / caption folders as raw inputs;
- ``tfds_builder.prepare_dataset``: write them as an array_record TFDS dataset;
- ``reader.open_source``: random-access reading of a prepared (or any image+caption) TFDS dataset;
- ``transforms``: the official per-record recipe (VAE and CLIP inputs, tokens, CFG drops);
- ``pipeline``: the sharded, checkpointable Grain batch iterator and global-array assembly;
- ``synthetic``: a small learnable dataset for tests and demos.
"""
