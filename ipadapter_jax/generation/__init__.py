"""The generation core, one floor below `pipelines/` and `training/`, which both build on it:

    conditioning    what the UNet sees per step (text, SDXL added conditions, IP tokens/scales/masks), CFG batches
    denoise         the denoising loop as one pure function (a `lax.fori_loop`)
    image_features  the CLIP features an adapter reads, the official negative branch, CLIP preprocessing
    prompts         tokenisation and text encoding
    stages          the compiled stages (jit): text, image features and tokens, VAE encode/decode, the loop
"""
