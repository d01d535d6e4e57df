"""Training a head through the frozen Qwen-Image transformer (flow matching) and what it needs: σ
sampling, packed latents, the velocity loss, on-disk latent/prompt caches."""
