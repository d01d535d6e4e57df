"""Test helpers for running the pack inside a real ComfyUI (checkout in `COMFYUI_DIR`).

| module            | what                                                                       |
|-------------------|----------------------------------------------------------------------------|
| `env`             | find `COMFYUI_DIR`, the reason to skip, in-process `comfy.*` imports (CPU)  |
| `server`          | start/stop a ComfyUI server (fresh --base-directory, packs symlinked in)    |
| `prompt_queue`    | queue an API-format workflow on /prompt and wait on /history               |
| `browser`         | headless Chromium (system chromium + Playwright's Python package): load a  |
|                   | UI workflow, report missing nodes / dialogs, queue from the page           |
| `tiny_native`     | random-weight Qwen-Image files the native loaders accept (never committed) |
| `test_pack/`      | a test-only node pack: a loader for the tiny text encoder (CLIPLoader      |
|                   | always builds the full 7B encoder)                                         |

Only the standard library at import time; playwright / comfy / diffusers are imported where used.
"""
