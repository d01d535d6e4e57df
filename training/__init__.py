"""Head training over the core: data and split, caches, targets, the loop, checkpoints and resume, plots.

`qwen-identity train` (cli/train.py) parses arguments into a `TrainConfig` and calls
`pipeline.run_training`; the loop itself (`loop.train_head`) works on plain tensors.
"""
