"""OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn): `dsv2 serve`, or from Python

    from dsv2 import LLM
    from dsv2.serve import ServerConfig, run_server
    run_server(LLM("path/to/model"), ServerConfig(model_name="my-model"), port=8000)
"""
from .app import build_app
from .config import ServerConfig
from .server import run_server

__all__ = ["ServerConfig", "build_app", "run_server"]
