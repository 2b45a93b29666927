"""The unified Llama-style transformer with MM-RoPE and the next-token / next-scale / next-block modes."""
