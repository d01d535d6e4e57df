"""A person's identity from photos: Qwen3-VL loading, feature extraction, captions, seed-dir data."""
