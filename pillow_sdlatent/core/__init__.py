"""The normative, bit-exact part of the format (FORMAT.md): container, modes, quantizers, coders and the
read path down to the dequantized latent. Torch-free, and no network is ever loaded from here."""
