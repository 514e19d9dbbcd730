"""`dsv2 export RUN_DIR OUT_DIR`: a training checkpoint (one-process step-N.pt or data-parallel step-N/, in one
process; pretraining, SFT or GRPO) -> a Hugging Face model directory.

A LoRA run's checkpoint holds the adapters only: they are applied to the run's base model and merged into its
weights (train/lora.py merge_lora), or with adapter_only written as they are in PEFT's adapter layout.

OUT_DIR gets config.json, model.safetensors (published per-expert key layout, via `write_model`), the tokenizer
files the data was prepared with, and generation_config.json -- what `dsv2.load_model`, the dsv2 engine and
`transformers.AutoModelForCausalLM.from_pretrained` all read. All of them are written into one staging directory
that replaces OUT_DIR as a whole (fileio.atomic_directory), so a crash never leaves new weights beside an old
tokenizer; other files already in OUT_DIR (a README, a model card) are kept.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ..checkpoint import is_weight_file, write_model
from ..config import ModelConfig
from ..fileio import atomic_directory
from ..model import build_model
from .checkpointing import load_latest
from .loop import TOKENIZER_FILES
from .sharded_checkpoint import load_sharded

# DeepSeek-Coder-V2-Lite's generation_config.json sampling defaults, plus a mild repetition penalty: models as
# small as the ones trained here on a CPU fall into loops without it
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.3, "top_p": 0.95, "repetition_penalty": 1.1}


def export(run_dir: str, out_dir: str, step: int | None = None, dtype: torch.dtype | None = None,
           adapter_only: bool = False) -> dict:
    """Write checkpoint `step` (default: the newest) of `run_dir` to `out_dir` in `dtype` (default: float32, as
    trained); adapter_only: a LoRA run's adapters in PEFT's layout instead. Returns what was written."""
    cfg = ModelConfig.from_pretrained(run_dir)
    loaded = load_latest(run_dir, step)
    if loaded is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet; train first (checkpoints are written every "
                                "--save-every steps and at the end)")
    state, path = loaded
    lora = "lora_config" in state  # a LoRA SFT run's checkpoint: the adapters, not the weights
    if adapter_only and not lora:
        raise ValueError(f"--adapter-only: {path} is not from a LoRA `dsv2 sft` run (it holds the whole model); "
                         "export it without --adapter-only")
    if lora:
        from .lora import merge_lora, save_adapter
        from .sft import SftConfig, load_lora_run_model
        model = load_lora_run_model(run_dir, state)
        if adapter_only:
            save_adapter(model, out_dir, SftConfig.load(run_dir).model)
            return {"out_dir": out_dir, "checkpoint": path, "step": state["step"], "adapter": True,
                    "params": sum(p.numel() for p in model.parameters() if p.requires_grad), "dtype": "float32",
                    "tokenizer_files": [], "bytes": _size(out_dir)}
        merge_lora(model)
    else:
        model = build_model(cfg, init=False)
        if "model" in state:
            model.load_state_dict(state["model"])
        else:  # a data-parallel run's sharded checkpoint, assembled into the whole model
            load_sharded(path, model)
    tok_dir = os.path.join(run_dir, "tokenizer")
    copied = []
    with atomic_directory(out_dir, keep=lambda name: not is_weight_file(name)) as staging:
        write_model(model, staging, dtype=dtype)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copyfile(os.path.join(tok_dir, name), os.path.join(staging, name))
                copied.append(name)
        base_gen = os.path.join(run_dir, "generation_config.json")  # a fine-tune keeps its base model's
        if os.path.isfile(base_gen):
            shutil.copyfile(base_gen, os.path.join(staging, "generation_config.json"))
        else:
            gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **GENERATION_DEFAULTS}
            with open(os.path.join(staging, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(gen, f, indent=2)
                f.write("\n")
    return {"out_dir": out_dir, "checkpoint": path, "step": state["step"], "params": model.num_params(),
            "dtype": str(dtype or torch.float32).removeprefix("torch."), "tokenizer_files": copied,
            "bytes": _size(out_dir)}


def _size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
