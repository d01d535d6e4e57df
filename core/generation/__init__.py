"""Qwen-Image generation with diffusers: prompt encoding, the sampling loop, batching, the α-grid."""
