"""Visual tokenizers (pixels <-> discrete tokens): quantizers, multi-scale, 1D, binary, video."""
