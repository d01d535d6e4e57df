"""Safe file handling: atomic writes, the safetensors reader for user files, paths kept inside folders,
the out-dir lock, photo decoding and content fingerprints."""
