"""Files shipped inside the package: the small DeepSeek-V2 that dsv2 trains and uses when no model is given."""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "dsv2-tiny-stdlib")


def default_model_path() -> str:
    if not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")):
        raise FileNotFoundError(
            f"the default model is not in this install ({DEFAULT_MODEL}); pass --model PATH "
            "(a Hugging Face DeepSeek-V2 directory)")
    return DEFAULT_MODEL
