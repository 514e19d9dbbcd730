"""lm_head and cross-entropy fused, chunk by chunk: the training loss without the [N, V] logits.

The two-step form -- logits = h @ W^T, then F.cross_entropy -- materializes the logits (4,096 tokens x 102,400
words of V2-Lite's vocabulary: 1.7 GB in fp32), their log-softmax for backward, and in backward a gradient of the
same size. Here the rows go through in chunks of ~8M logits: each chunk's logits are made, turned into the loss and,
when a gradient is wanted, straight into the chunk's gradient (softmax minus the one-hot target, times the
token's weight), which is multiplied into dh and dW at once and dropped. The loss is a weighted sum over tokens
(the mean is weights 1/n), so the gradient is known in the forward up to the one scalar backward brings.

Same matmuls as the two-step form (logits, dh, dW), one fewer pass over the logits, and memory of one chunk.
Under bf16 autocast the matmuls run in bf16 (as autocast runs lm_head), the softmax in fp32.
`cross_entropy_reference` is the slow twin the tests compare against.

Shape legend: N tokens, H hidden, V vocabulary, C rows of a chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_LOGITS = 1 << 23  # logits per chunk (32 MB in fp32)
IGNORE = -100  # targets that count nothing (F.cross_entropy's ignore_index)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i weights_i * CE(h_i @ weight^T, targets_i): h [N, H], weight [V, H], targets [N] (IGNORE: left out),
    weights [N] (default: 1 / the number of counted targets, i.e. the mean). -> fp32 scalar. Under autocast the
    matmuls take autocast's dtype."""
    counted = targets != IGNORE
    weights = token_weights(counted, weights)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    rows = chunk_rows or max(16, CHUNK_LOGITS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets.masked_fill(~counted, 0), weights, dtype, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, weights, dtype, rows):
        N = h.shape[0]
        x, w = h.to(dtype), weight.to(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(x) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, rows):
            xc, t, wt = x[s:s + rows], targets[s:s + rows], weights[s:s + rows]
            z = (xc @ w.T).float()  # [C, V]
            picked = z.gather(1, t.unsqueeze(1)).squeeze(1)  # the targets' logits, before z is overwritten
            top = z.amax(dim=1, keepdim=True)
            e = z.sub_(top).exp_()  # in place: exp(z - max)
            norm = e.sum(dim=1, keepdim=True)
            lse = top.squeeze(1) + norm.log().squeeze(1)
            total += (wt * (lse - picked)).sum()
            if want_h or want_w:  # d loss / d z = weight * (softmax - one-hot)
                g = e.mul_(wt.unsqueeze(1) / norm)
                g.scatter_add_(1, t.unsqueeze(1), -wt.unsqueeze(1))
                g = g.to(dtype)
                if want_h:
                    torch.mm(g, w, out=grad_h[s:s + rows])
                if want_w:
                    grad_w += (g.T @ xc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = None if grad_h is None else (grad_h * grad.to(grad_h.dtype)).to(h_dtype)
        dw = None if grad_w is None else (grad_w * grad).to(w_dtype)
        return dh, dw, None, None, None, None


def cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            weights: torch.Tensor | None = None) -> torch.Tensor:
    """The two-step form linear_cross_entropy replaces: F.linear, then the loss of those logits."""
    return cross_entropy_of(F.linear(h, weight), targets, weights)


def cross_entropy_of(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """linear_cross_entropy's loss of given logits [N, V] (in fp32): the mean over the counted targets, or
    sum_i weights_i * CE_i."""
    ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")
    return (token_weights(targets != IGNORE, weights) * ce).sum()


def token_weights(counted: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each token's weight in the loss [N] fp32: the given weights, or 1 / the number counted (the mean); 0 where a
    target is not counted."""
    if weights is None:
        return counted.float() / counted.sum().clamp(min=1)
    return weights.float() * counted
