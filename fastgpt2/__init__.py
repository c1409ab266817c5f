from .runtime.config import GPT2Config
