"""Completions from a trained model by the plainest loop there is -- a full forward over the whole sequence for
every new token, no cache -- for model cards and spot checks, independent of the inference engine.

    python -m dsv2.train.samples src/dsv2/assets/dsv2-tiny-stdlib --max-new-tokens 120
"""
from __future__ import annotations

import argparse

import torch

from ..checkpoint import load_model
from ..tokenizer import Tokenizer

PROMPTS = ("def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\ndef list_python_files(",
           "    def __repr__(self):")


@torch.no_grad()
def complete(model, tok: Tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> str:
    """Greedy when temperature == 0, else nucleus sampling; stops at eos or the model's context length."""
    ids = tok.encode(prompt)
    g = torch.Generator().manual_seed(seed)
    limit = model.config.max_position_embeddings
    new: list[int] = []
    for _ in range(max_new_tokens):
        if len(ids) >= limit:
            break
        logits = model(torch.tensor([ids]))[0, -1]  # [V] fp32
        if temperature == 0:
            t = int(logits.argmax())
        else:
            probs = (logits / temperature).softmax(-1)
            p, order = probs.sort(descending=True)
            keep = p.cumsum(-1) - p < top_p  # the smallest set whose mass reaches top_p
            t = int(order[keep][torch.multinomial(p[keep] / p[keep].sum(), 1, generator=g)])
        if t in model.config.eos_token_ids:
            break
        ids.append(t)
        new.append(t)
    return tok.decode(new)


def main() -> None:
    ap = argparse.ArgumentParser(description="greedy and sampled completions, as markdown")
    ap.add_argument("model")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model, tok = load_model(a.model), Tokenizer.from_pretrained(a.model)
    for prompt in PROMPTS:
        for label, temp in (("greedy", 0.0), (f"sampled, temperature {a.temperature}, top-p {a.top_p}, seed {a.seed}",
                                                a.temperature)):
            text = complete(model, tok, prompt, a.max_new_tokens, temp, a.top_p, a.seed)
            print(f"**{label}**\n\n```python\n{prompt}{text}\n```\n")


if __name__ == "__main__":
    main()
