"""ComfyUI entry point of the Qwen identity pack (also the `qwen_identity` package when pip-installed).

ComfyUI imports this folder as a package under whatever name the folder has; everything inside is
imported relatively (ComfyUI owns the top-level name `nodes`).
"""

# ComfyUI serves this folder at /extensions/<pack folder>/; its docs/<NodeName>.md pages are the node info
# panel's text (generated from docs/ by tests/build_node_docs.py). No JavaScript lives there.
WEB_DIRECTORY = "./web"

if __package__:  # imported as a package (ComfyUI, pip). pytest may import this file bare; then it is inert.
    from .version import __version__
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folders
    from .nodes.example_photos import install_example_photos

    register_model_folders()
    install_example_photos()   # into ComfyUI's input/ where missing, so the example workflows open complete

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
