"""Head training: argument handling and loops over the core (the `qwen-identity train` command)."""
