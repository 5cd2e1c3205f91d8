"""Best-effort ML around the normative core: nothing here changes what a file's bytes mean.

``restore`` cleans the dequantized latent before the decoder, ``effort`` spends encoder time on a
latent that decodes better after quantization, ``unet`` denoises with Stable Diffusion's UNet.
"""
