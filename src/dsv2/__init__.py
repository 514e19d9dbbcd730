"""dsv2: DeepSeek-V2 on PyTorch -- the exact model, a latent-cache inference engine, an OpenAI-compatible server,
and the training pipeline the paper describes."""
__version__ = "0.1.0"  # first: modules imported below read it

from .checkpoint import load_model, save_model
from .config import ModelConfig
from .engine.llm import LLM
from .engine.outputs import CompletionOutput, RequestOutput
from .engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ModelConfig", "load_model", "save_model",
           "__version__"]
