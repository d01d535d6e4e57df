"""The residual head (model and checkpoint format), its caption targets, and injecting its residual
into prompt embeddings / ComfyUI conditioning."""
