"""dsv2: DeepSeek-V2 on PyTorch -- the exact model, a latent-cache inference engine, an OpenAI-compatible server,
and the training pipeline the paper describes."""
from .checkpoint import load_model, save_model
from .config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "load_model", "save_model", "__version__"]
