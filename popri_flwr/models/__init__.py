"""Models: loading (packaged GGUF, Hub, local), generation and token sampling, the DPO step,
the sentence embedder. No Flower imports."""
