"""Models: loading (packaged GGUF, Hub, local), generation and token sampling, the DPO step,
the tilt's weighted fit, the sentence embedder. No Flower imports."""
