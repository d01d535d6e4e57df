"""The ComfyUI-free core: plain torch / transformers / diffusers code.

Nothing under `core/` imports ComfyUI (`comfy`, `folder_paths`, `nodes`); the node classes in
`nodes/` and the CLI in `cli/` are thin adapters over it. A test enforces the rule.
"""
