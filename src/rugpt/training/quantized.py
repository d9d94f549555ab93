"""A frozen base in int8 for LoRA: weight-only int8 linear layers that PEFT wraps like any `nn.Linear`.

Each weight row is stored as int8 with one fp32 scale (symmetric, scale = max |row| / 127): a quarter of fp32,
so ruGPT-3.5-13B's 12.6 B block weights take 12.6 GB. The forward product dequantizes a block of rows at a
time (at most `_BLOCK_BYTES` of float weight alive); the backward pass gives the input its gradient the same
way and never saves a float copy of the weight. The base is frozen: int8 weights get no gradient.

`Int8Linear` subclasses `nn.Linear`, so PEFT's LoRA wraps it with its own `lora.Linear` (no custom-module
registration), and the adapter it saves has the same tensors as one trained on the float model: it loads in
plain PEFT on top of the original checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BLOCK_BYTES = 64 * 2**20


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float → (int8 [out, in], fp32 scale [out]) with weight ≈ int8 × scale per row."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _row_blocks(weight: torch.Tensor, dtype: torch.dtype) -> int:
    return max(1, _BLOCK_BYTES // (weight.shape[1] * torch.finfo(dtype).bits // 8))


class _Int8Product(torch.autograd.Function):
    """y = x @ (q × scale).T + bias, dequantizing blocks of rows; only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(q, scale)  # references to the module's own tensors: no copy
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        rows = _row_blocks(q, dtype)
        xs = x.to(dtype)
        parts = [F.linear(xs, q[r:r + rows].to(dtype) * scale[r:r + rows, None].to(dtype))
                 for r in range(0, q.shape[0], rows)]
        out = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return out + bias.to(dtype) if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        q, scale = ctx.saved_tensors
        dtype, rows = ctx.dtype, _row_blocks(q, ctx.dtype)
        grad = grad_out.to(dtype)
        grad_x = None
        for r in range(0, q.shape[0], rows):
            part = grad[..., r:r + rows] @ (q[r:r + rows].to(dtype) * scale[r:r + rows, None].to(dtype))
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(ctx.x_dtype), None, None, None


class Int8Linear(torch.nn.Linear):
    """A frozen linear layer with an int8 weight [out, in] and an fp32 scale per output row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        torch.nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        self.out_features, self.in_features = q.shape
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, in_out_layout: bool = False) -> Int8Linear:
        """From an nn.Linear weight [out, in], or a GPT-2 Conv1D weight [in, out] with `in_out_layout`."""
        q, scale = quantize_rows(weight.T if in_out_layout else weight)
        return cls(q, scale, bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Product.apply(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, fp32 row scales"


def quantize_linears(model: torch.nn.Module) -> int:
    """Replace every linear layer of `model` except its output head by an `Int8Linear`, layer by layer (so at
    most one float layer is copied at a time); returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (Conv1D, torch.nn.Linear)) and not isinstance(module, Int8Linear)
               and module is not head]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = Int8Linear.from_float(module.weight, module.bias, in_out_layout=isinstance(module, Conv1D))
        setattr(parent, child, quantized.to(module.weight.device))
    return len(targets)


def load_int8_base(name: str | None):
    """Load `name` (alias, hub id or folder) with its blocks' linear weights quantized to int8 as they are read,
    one tensor at a time: memory peaks near the int8 model plus one float tensor, never the float model (the
    model is built on the meta device and each tensor from the files takes its place, and the file's pages
    under it are dropped once it is in: a mapped shard would otherwise stay resident). Returns LoadedModel."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from rugpt.architectures import register
    from rugpt.engines.memory import release_file_pages
    from rugpt.errors import ModelNotFound
    from rugpt.models import LoadedModel, checkpoint_folder, load_tokenizer, resolve
    from rugpt.special_tokens import resolve_special_ids
    from rugpt.weights import safetensors_files, weights_folder

    source = resolve(name)
    folder = checkpoint_folder(name or "tiny", source)
    register()
    tokenizer = load_tokenizer(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = set(model.state_dict())
    prefix = model.base_model_prefix + "."
    with torch.no_grad():
        for file in safetensors_files(weights_folder(folder)):
            with safe_open(file, framework="pt") as f:
                for stored in f.keys():
                    key = stored if stored in names else prefix + stored
                    if key in names:
                        tensor = f.get_tensor(stored)  # a view of the file's mapping
                        _place(model, key, tensor)
                        release_file_pages(tensor)  # copied or quantized: its pages need not stay resident
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ModelNotFound(f"{name or 'tiny'} lacks weights: {', '.join(missing[:3])}")
    model.name_or_path = model.config._name_or_path = str(folder)
    if getattr(model.config, "auto_map", None):
        del model.config.auto_map
    loaded = LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name or "tiny", source=source, device="cpu",
                         folder=folder)
    loaded.sampleable_vocab = resolve_special_ids(tokenizer, model, folder).sampleable
    return loaded


def _place(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put one stored tensor into the meta-built model: a block's linear weight as int8, the rest as fp32."""
    from transformers.pytorch_utils import Conv1D

    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path)
    if leaf == "weight" and isinstance(module, (Conv1D, torch.nn.Linear)) and not isinstance(module, Int8Linear) \
            and module is not model.get_output_embeddings():
        quantized = Int8Linear.from_float(tensor, None, in_out_layout=isinstance(module, Conv1D))
        quantized.bias = module.bias  # still on meta when the bias comes later in the file
        if quantized.bias is not None:
            quantized.bias.requires_grad_(False)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
        return
    # Copies, never views: a view of the file's mapping would keep the whole file resident.
    if isinstance(module, Int8Linear) and leaf == "bias":
        module.bias = torch.nn.Parameter(tensor.to(torch.float32, copy=True), requires_grad=False)
        return
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor.to(torch.float32, copy=True), requires_grad=True)
    else:
        module._buffers[leaf] = tensor.to(torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)
