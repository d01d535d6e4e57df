"""Test-only ComfyUI node pack (linked into the test server next to the real pack; never shipped).

ComfyUI's CLIPLoader always builds the full 28-layer Qwen2.5-VL-7B text encoder, too big to fake
with random weights in a test. `TinyQwenImageCLIPLoader` loads the random one-layer, full-width
(3584) encoder written by `comfyui_harness.tiny_native` through ComfyUI's own `comfy.sd.load_clip`
(CLIPType.QWEN_IMAGE, with a config override), so CLIPTextEncode and everything after it run
unchanged. The integration tests swap it in for CLIPLoader in copies of the committed workflows.
"""

TINY_TE_CONFIG = dict(hidden_size=3584, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=28, num_key_value_heads=4)  # widths of the real encoder, one thin layer


class TinyQwenImageCLIPLoader:
    CATEGORY = "Qwen Identity/tests"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    DESCRIPTION = "Test only: loads the random one-layer Qwen-Image text encoder of the integration suite."

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {
            "clip_name": (folder_paths.get_filename_list("text_encoders"), {"tooltip": "tiny encoder file"}),
            "type": (["qwen_image"], {"tooltip": "always qwen_image"}),
        }}

    def load(self, clip_name, type="qwen_image"):
        import comfy.sd
        import folder_paths

        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        clip = comfy.sd.load_clip(ckpt_paths=[path], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=comfy.sd.CLIPType.QWEN_IMAGE,
                                  model_options={"qwen25_7b_model_config": TINY_TE_CONFIG})
        return (clip,)


NODE_CLASS_MAPPINGS = {"TinyQwenImageCLIPLoader": TinyQwenImageCLIPLoader}
