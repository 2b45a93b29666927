"""Decoding algorithms: sampling, CFG, speculative Jacobi decoding and its relatives, block decoders."""
