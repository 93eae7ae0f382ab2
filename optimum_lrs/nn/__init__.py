"""The factorised layer and the kernels behind its forward."""
