"""Peak memory of one fine-tuning process, estimated before the model loads (issue 20).

The model of memory, term by term (bytes):
  weights       parameters × 4 (fp32 masters); under --quantize-base the blocks' linear weights × 1 + a scale
                per row, the rest × 4
  gradients     trained parameters × 4 (they live across the micro-batches of a step)
  optimizer     AdamW 8 per trained parameter, 8-bit AdamW 2, Adafactor 4 per row + column of each matrix
  activations   what autograd saves for the backward pass, per micro-batch. Not a formula typed in here:
                measured on the spot on a narrow copy of the architecture (same head size, 2 heads, 1 and 2
                layers, 3 lengths, on the training device and precision, with LoRA / int8 as in the run), split
                into a part linear in the tokens and one quadratic in the length (attention matrices, which
                torch's CPU attention materialises when dropout is on), and scaled to the real width and heads.
                With gradient checkpointing: each layer's input, plus one layer recomputed.
  loss          the fused loss (training/loss.py): two chunks of fp32 logits, the gradient of the hidden
                states, and of the head's weight when it is trained
  autocast      bf16 / fp16 copies of the trained matrices, cached for the step under mixed precision
  transients    the backward pass's widest temporaries (two of the largest per-layer activation); at the
                optimizer step, Adafactor's three temporaries of the largest parameter (fused AdamW has none)
  working       the loop's own (data, tokenizer, allocator arenas): 64 MB on a CPU
peak = working + weights + gradients + optimizer
       + max(autocast + activations + max(loss, recomputed layer + backward transients), optimizer transients)

On a CPU the peak is the process's resident memory, which glibc's allocator would inflate: its dynamic mmap
threshold keeps freed tensors of up to 32 MB (gradients, activations) in the heap. `return_freed_memory`
fixes the threshold so that freed tensors go back to the system and the resident peak is the live peak.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from rugpt.training.loss import chunk_tokens_for
from rugpt.training.model_prep import LoraSpec
from rugpt.training.settings import Optimizer

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# Besides the terms: the data, the tokenizer, accelerate, allocator arenas (measured: 40-80 MB on a CPU).
WORKING = {"cpu": 64 * 2**20, "cuda": 0}
_PROBE_HEADS = 2
# Lengths no width or head size equals, so a tensor with two dimensions of the length is an attention matrix.
_PROBE_LENGTHS = (20, 44, 100)


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a config by building the model on the meta device (no weights)."""

    config: object
    layers: int
    width: int
    heads: int
    vocab: int
    context: int
    params: int  # distinct parameters (tied embeddings once)
    largest: int  # elements of the largest parameter tensor
    factored: int  # Adafactor state: rows + columns of each matrix, all elements of each vector
    block_linear: int  # weights of the linear layers inside the blocks (what --quantize-base holds in int8)
    block_linear_rows: int  # their output rows (one int8 scale each)
    head_tied: bool
    linear_shapes: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every linear layer in the blocks

    @classmethod
    def from_config(cls, config) -> ModelShape:
        from transformers import AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        from rugpt.architectures import register

        register()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = {id(p): p for p in model.parameters()}.values()
        linears = []
        for name, module in model.named_modules():
            if isinstance(module, Conv1D):
                linears.append((name, module.weight.shape[0], module.weight.shape[1]))
            elif isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
                linears.append((name, module.in_features, module.out_features))
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        return cls(config=config, layers=config.num_hidden_layers, width=config.hidden_size,
                   heads=config.num_attention_heads, vocab=config.vocab_size,
                   context=int(getattr(config, "n_positions", None) or config.max_position_embeddings),
                   params=sum(p.numel() for p in params), largest=max(p.numel() for p in params),
                   factored=sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in params),
                   block_linear=sum(i * o for _, i, o in linears), block_linear_rows=sum(o for *_, o in linears),
                   head_tied=head is not None and head.weight is embeddings.weight, linear_shapes=tuple(linears))

    def lora_params(self, lora: LoraSpec) -> int:
        """Parameters of the LoRA adapters `lora` would add."""
        return sum(lora.rank * (i + o) for name, i, o in self.linear_shapes if name.rsplit(".", 1)[-1] in lora.targets)


@dataclass(frozen=True)
class RunShape:
    """How the run uses the model: everything the estimate needs besides the plan's own choices."""

    block: int
    lora: LoraSpec | None  # None: full fine-tuning
    quantize_base: bool
    device_type: str  # "cpu" or "cuda"
    autocast: torch.dtype | None  # bf16 / fp16 mixed precision, or None for fp32


@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves for one sequence of `block` tokens, at the real width (see the module docstring)."""

    per_layer: int
    outside_layers: int  # embeddings and the final norm
    checkpointed_per_layer: int  # a layer's input, what gradient checkpointing keeps
    widest: int  # the largest single saved tensor of a layer (the backward pass's temporaries are its size)


@dataclass(frozen=True)
class _Saved:
    total: int
    widest_linear: int  # largest saved tensor with one dimension of the length
    widest_square: int  # largest with two (attention matrices)


_PROBES: dict[tuple, tuple[list[_Saved], list[_Saved]]] = {}


def measure_activations(shape: ModelShape, run: RunShape) -> Activations:
    """Saved activations of the real architecture, measured on narrow copies of it (module docstring)."""
    head_dim = shape.width // shape.heads
    scale_width, scale_heads = shape.width / (head_dim * _PROBE_HEADS), shape.heads / _PROBE_HEADS
    key = (shape.config.to_json_string(), replace(run, block=0))
    if key not in _PROBES:  # the probes do not depend on the block size: plans for several share them
        _PROBES[key] = tuple([_saved_bytes(shape, run, layers, length) for length in _PROBE_LENGTHS]
                             for layers in (1, 2))
    one, two = _PROBES[key]
    layer = _fit_length(*(b.total - a.total for a, b in zip(one, two, strict=True)))
    outside = _fit_length(*(2 * a.total - b.total for a, b in zip(one, two, strict=True)))
    t, longest = run.block, _PROBE_LENGTHS[-1]
    widest = max(one[-1].widest_linear / longest * t * scale_width,
                 one[-1].widest_square / longest**2 * t * t * scale_heads)
    return Activations(per_layer=int(layer[1] * t * scale_width + max(layer[2], 0.0) * t * t * scale_heads),
                       outside_layers=int(max(outside[1], 0.0) * t * scale_width),
                       checkpointed_per_layer=4 * shape.width * t, widest=int(widest))


def _fit_length(at_short: float, at_mid: float, at_long: float) -> tuple[float, float, float]:
    """(constant, per token, per token²) through the three probe lengths."""
    lengths = torch.tensor(_PROBE_LENGTHS, dtype=torch.float64)
    system = torch.stack([torch.ones(3, dtype=torch.float64), lengths, lengths**2], dim=1)
    solution = torch.linalg.solve(system, torch.tensor([at_short, at_mid, at_long], dtype=torch.float64))
    return tuple(float(x) for x in solution)


def _probe_config(config, layers: int, length: int):
    """The architecture at 2 heads of the real head size, `layers` layers, a tiny vocabulary."""
    probe = copy.deepcopy(config)
    head_dim = config.hidden_size // config.num_attention_heads
    ratio = _PROBE_HEADS * head_dim / config.hidden_size
    for name in ("n_inner", "intermediate_size"):
        if getattr(probe, name, None):
            setattr(probe, name, max(1, round(getattr(probe, name) * ratio)))
    probe.hidden_size, probe.num_attention_heads = _PROBE_HEADS * head_dim, _PROBE_HEADS
    probe.num_hidden_layers = layers
    probe.vocab_size = 64
    if hasattr(probe, "n_positions"):
        probe.n_positions = max(length, 2)
    else:
        probe.max_position_embeddings = max(length, getattr(probe, "sparse_block_size", 1) or 1, 2)
    return probe


def _saved_bytes(shape: ModelShape, run: RunShape, layers: int, length: int) -> _Saved:
    """What autograd saves in the trunk's forward for one sequence of the probe model."""
    from transformers import AutoModelForCausalLM

    from rugpt.training.model_prep import prepare_for_training

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_probe_config(shape.config, layers, length))
    model = prepare_for_training(model, lora=run.lora, quantize_base=run.quantize_base, gradient_checkpointing=False)
    model.to(run.device_type)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, tuple[int, int]] = {}  # storage → (bytes, dimensions of the length)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = (storage.nbytes(), list(tensor.shape).count(length))
        return tensor

    ids = torch.randint(0, 64, (1, length), device=run.device_type)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            run.device_type, dtype=run.autocast or torch.bfloat16, enabled=run.autocast is not None):
        _trunk(model)(input_ids=ids, use_cache=False)
    sizes = saved.values()
    return _Saved(sum(b for b, _ in sizes), max((b for b, n in sizes if n == 1), default=0),
                  max((b for b, n in sizes if n >= 2), default=0))


def _trunk(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(lm, lm.base_model_prefix)


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate's terms in bytes, in the order they are printed; `total` is the peak."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved by the forward pass
    recomputed: int  # one layer's activations, recomputed in the backward pass under gradient checkpointing
    loss: int
    autocast: int
    backward_temporaries: int
    optimizer_temporaries: int
    working: int  # the loop's own: data, tokenizer, allocator arenas

    @property
    def total(self) -> int:
        # The loss's buffers are gone (its weight gradient handed over) before the backward pass makes its own.
        in_backward = self.recomputed + self.backward_temporaries
        during_pass = self.autocast + self.activations + max(self.loss, in_backward)
        return (self.working + self.weights + self.gradients + self.optimizer
                + max(during_pass, self.optimizer_temporaries))

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("recomputed layer", self.recomputed),
                ("loss (chunked)", self.loss), ("autocast weight copies", self.autocast),
                ("backward temporaries", self.backward_temporaries),
                ("optimizer-step temporaries", self.optimizer_temporaries), ("working memory", self.working)]


def return_freed_memory() -> bool:
    """Have glibc return every freed block of 1 MB or more to the system at once (module docstring); no
    measurable cost in speed (page faults are small next to the products). False where it cannot (not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 2**20))
    except (OSError, AttributeError):
        return False


def trained_params(shape: ModelShape, run: RunShape) -> int:
    return shape.params if run.lora is None else shape.lora_params(run.lora)


def estimate(shape: ModelShape, run: RunShape, activations: Activations, micro: int, checkpointing: bool,
             optimizer: Optimizer) -> MemoryEstimate:
    """Peak bytes of one process for a micro-batch of `micro` sequences (module docstring)."""
    trained = trained_params(shape, run)
    if run.quantize_base:
        weights = shape.block_linear + 4 * shape.block_linear_rows + 4 * (shape.params - shape.block_linear)
    else:
        weights = 4 * shape.params
    state = {Optimizer.adamw: 8 * trained, Optimizer.adamw8bit: 2 * trained,
             Optimizer.adafactor: 4 * (shape.factored if run.lora is None else trained)}[optimizer]
    per_layer = activations.checkpointed_per_layer if checkpointing else activations.per_layer
    tokens = micro * run.block
    head_trained = run.lora is None
    loss = 2 * 4 * min(chunk_tokens_for(shape.vocab), tokens) * shape.vocab + 4 * tokens * shape.width
    loss += 4 * shape.vocab * shape.width if head_trained else 0
    autocast = 2 * trained if run.autocast is not None else 0
    step_temporaries = 3 * 4 * shape.largest if optimizer == Optimizer.adafactor else 0
    return MemoryEstimate(weights=weights, gradients=4 * trained, optimizer=state,
                          activations=micro * (shape.layers * per_layer + activations.outside_layers),
                          recomputed=micro * activations.per_layer if checkpointing else 0, loss=loss,
                          autocast=autocast, backward_temporaries=2 * micro * activations.widest,
                          optimizer_temporaries=step_temporaries, working=WORKING[run.device_type])
