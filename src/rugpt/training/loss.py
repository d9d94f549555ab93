"""The next-token loss of a causal language model, computed without ever holding the whole logits.

At ruGPT-3's vocabulary (50264) the logits of one micro-batch of 4 × 1024 tokens take 0.8 GB in fp32, and
cross-entropy's softmax and its gradient as much again each: the largest part of a fine-tuning step's memory
after the stored activations (issue 20). Here the output projection is fused with the loss, chunk by chunk of
tokens: logits = hidden @ W.T for one chunk, its loss, and — when gradients are wanted — their gradients with
respect to hidden and W at once (softmax - one-hot), as Liger-Kernel's fused linear cross-entropy does.
Backward only scales what forward computed, so the cost is the plain computation's three matrix products and
at most one chunk of logits is alive. Same loss and gradients as the plain computation (tests: 1e-5).

One rule for every trainer (fine-tuning, pre-training, prompt tuning): position t predicts token t + 1;
labels use the Hugging Face convention (the token itself at its own position, IGNORE_INDEX where it is not a
target) and are shifted here, never the logits.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Bytes of one chunk's fp32 logits: ~650 tokens at ruGPT-3's vocabulary. Large enough that the products stay
# efficient, small enough to be a rounding error next to the weights (the softmax needs a second such buffer).
DEFAULT_CHUNK_BYTES = 128 * 2**20


def chunk_tokens_for(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk of fp32 logits takes about `chunk_bytes` (at least 16 tokens)."""
    return max(16, chunk_bytes // (4 * vocab_size))


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels at their own positions → what each position predicts (the next label; IGNORE at the end)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NLL per token of one chunk [C] and, when asked, d(sum NLL)/d(logits) [C, V] = softmax - one-hot (0 on
    ignored rows). The logits buffer is reused for the softmax and the gradient (one extra [C, V] temporary)."""
    logits = hidden @ weight.T  # under autocast the product runs in bf16 / fp16; the softmax in fp32 (or fp64)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    keep = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    nll = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * keep
    if not want_grad:
        return nll, None
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(len(safe), device=safe.device), safe] -= 1.0
    probs.mul_(keep[:, None])
    return nll, probs


class _LinearCrossEntropy(torch.autograd.Function):
    """NLL of `labels` under softmax(hidden @ weight.T), chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, reduction: str):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nll = torch.empty(len(labels), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # With a per-token output the weight's gradient depends on each token's incoming gradient: recomputed.
        grad_w = _zeros_at_least_fp32(weight) if need_w and reduction == "sum" else None
        for start in range(0, len(labels), chunk):
            part = slice(start, start + chunk)
            nll[part], probs = _chunk_loss(hidden[part], weight, labels[part], need_h or need_w)
            if need_h:
                grad_h[part] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:  # in place: no [V, d] temporary
                grad_w.addmm_(probs.T.to(grad_w.dtype), hidden[part].to(grad_w.dtype))
        ctx.chunk, ctx.reduction, ctx.weight_dtype = chunk, reduction, weight.dtype
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.grad_h, ctx.grad_w = grad_h, grad_w
        if need_w and reduction == "none":
            ctx.save_for_backward(hidden, weight, labels)
        return nll.sum() if reduction == "sum" else nll

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out if ctx.reduction == "sum" else grad_out[:, None]
        grad_h = ctx.grad_h * scale.to(ctx.grad_h.dtype) if ctx.grad_h is not None else None
        if ctx.grad_w is not None:
            grad_w = (ctx.grad_w * grad_out).to(ctx.weight_dtype)
        else:
            grad_w = _recomputed_weight_grad(ctx, grad_out) if ctx.needs_input_grad[1] else None
        ctx.grad_h = ctx.grad_w = None  # backward runs once: free them now, not when the graph goes
        return grad_h, grad_w, None, None, None


def _zeros_at_least_fp32(weight: torch.Tensor) -> torch.Tensor:
    """The weight-gradient accumulator: fp32 for half-precision weights, so chunk sums do not round."""
    return torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _recomputed_weight_grad(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    hidden, weight, labels = ctx.saved_tensors
    device_type, enabled, dtype = ctx.autocast
    grad_w = _zeros_at_least_fp32(weight)
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
        for start in range(0, len(labels), ctx.chunk):
            part = slice(start, start + ctx.chunk)
            _, probs = _chunk_loss(hidden[part], weight, labels[part], True)
            probs.mul_(grad_out[part, None].to(probs.dtype))
            grad_w.addmm_(probs.T.to(grad_w.dtype), hidden[part].to(grad_w.dtype))
    return grad_w.to(weight.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         chunk_tokens: int | None = None,
                         reduction: Literal["sum", "none"] = "sum") -> torch.Tensor:
    """Cross-entropy of `labels` [N] under logits `hidden` [N, d] @ `weight`.T [d, V], never all [N, V] at once.

    `reduction='sum'` gives the summed NLL of the labelled tokens (IGNORE_INDEX rows count 0), 'none' the NLL per
    token [N] (0 on ignored rows). Gradients flow to `hidden` and `weight` as in the plain computation.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not allowed; use 'sum' or 'none'")
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, reduction)
    with torch.no_grad():
        nll = torch.cat([_chunk_loss(hidden[s:s + chunk], weight, labels[s:s + chunk], False)[0]
                         for s in range(0, len(labels), chunk)]) if len(labels) else hidden.new_zeros(0)
    return nll.sum() if reduction == "sum" else nll


def _backbone_and_head(model) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """The trunk that yields the last hidden states and the output projection's weight [V, d]; None when the
    model does not have that shape (a head with a bias, no base model), which then takes the plain path."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT keeps LoRA layers inside
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if get_head else None
    trunk = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if head is None or trunk is None or trunk is lm or getattr(head, "bias", None) is not None:
        return None
    weight = getattr(head, "weight", None)
    return (trunk, weight) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def next_token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    *, chunk_tokens: int | None = None, reduction: Literal["sum", "none"] = "sum") -> torch.Tensor:
    """Next-token cross-entropy of a causal LM: the sum over labelled tokens, or per position [B, T] ('none').

    `labels` [B, T] hold each token at its own position (IGNORE_INDEX where it is not a target), as for a
    Hugging Face model's `labels=`; position t is scored on predicting labels[t + 1].
    """
    return loss_on_targets(model, input_ids, shift_labels(labels), attention_mask, chunk_tokens=chunk_tokens,
                           reduction=reduction)


def loss_on_targets(model, input_ids: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    *, chunk_tokens: int | None = None, reduction: Literal["sum", "none"] = "sum") -> torch.Tensor:
    """The same, with `targets` [B, T] already aligned: targets[t] is what position t must predict (the
    pre-training recipe samples windows of block + 1 tokens and splits them into inputs and targets)."""
    parts = _backbone_and_head(model)
    if parts is None:  # plain path: the whole logits (models whose head does not fit the fused product)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                              reduction=reduction)
        return nll if reduction == "sum" else nll.view(targets.shape)
    trunk, weight = parts
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    nll = linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), chunk_tokens=chunk_tokens,
                               reduction=reduction)
    return nll if reduction == "sum" else nll.view(targets.shape)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens `next_token_loss` scores for these labels."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


class NextTokenLoss(torch.nn.Module):
    """A causal LM whose forward returns the summed next-token loss instead of logits.

    What a trainer hands to accelerate (DDP, FSDP, DeepSpeed): the loss is computed inside the wrapped
    forward, where sharded weights are gathered, and the logits never exist whole. `.model` is the LM.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int | None = None):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return next_token_loss(self.model, input_ids, labels, attention_mask, chunk_tokens=self.chunk_tokens)
