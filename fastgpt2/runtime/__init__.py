"""The GPT-2 runtime: config, checkpoint loading, the model, the KV cache and generation."""
