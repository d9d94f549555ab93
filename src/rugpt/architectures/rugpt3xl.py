"""ruGPT-3 XL as published by the community conversion `evilfreelancer/ruGPT3XL`, without its remote code.

The architecture is GPT-2's (pre-LayerNorm blocks, learned absolute positions, biased linear layers, a final
LayerNorm) with separate q/k/v projections, an untied output head, and DeepSpeed's block-sparse "fixed"
attention on the layers that `sparse_mode` selects. Run dense, the converted model scores perplexity ~50
instead of ~12, so the mask is part of the model, not an optimisation.

Names are those of the published checkpoint (read from EvilFreelancer/rugpt3xl-convert: config.json,
configuration_rugpt3xl.py, convert.py), so its files load unchanged:

- config.json keys: `vocab_size`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`,
  `intermediate_size`, `hidden_act` (default "gelu_new"), `max_position_embeddings`, `layer_norm_eps`,
  `embedding_dropout`, `attention_dropout`, `output_dropout`, `initializer_range`, `use_cache`, the token ids
  (pad 0, eos 1, bos 2), `tie_word_embeddings` (false), and the sparse keys taken here with these defaults:
  `sparse_mode` ("none"; or "alternating": layers 0, 2, 4, ... sparse, odd layers dense; or "all"),
  `sparse_block_size` (16), `sparse_num_local_blocks` (8), `sparse_num_global_blocks` (1),
  `sparse_num_different_global_patterns` (8).
- weights: `model.embed_tokens.weight`, `model.embed_positions.weight`,
  `model.layers.{i}.input_layernorm.{weight,bias}`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}`,
  `model.layers.{i}.post_attention_layernorm.{weight,bias}`, `model.layers.{i}.mlp.{up,down}_proj.{weight,bias}`,
  `model.norm.{weight,bias}`, `lm_head.weight` (no bias). Linear weights are stored [out, in] (nn.Linear).

The sparse layout is indexed by token *position* (position_ids, derived from the attention mask when not
given), not by the index in the padded batch, so a left-padded row computes exactly what it computes alone.

Remote code: after `rugpt.architectures.register()`, transformers' `AutoConfig` / `AutoModelForCausalLM`
see `model_type: "rugpt3xl"` as a local class and, with `trust_remote_code=False` (and even with True: a
registered class outside `transformers.` wins), never import the folder's `*_rugpt3xl.py` files; the unit
tests prove it with files that would raise SystemExit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from rugpt.errors import UsageError

SPARSE_MODES = ("none", "alternating", "all")
# transformers 5.x renamed the outputs' `past_key_values` field to `cache`; use whichever this version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@strict
class RuGPT3XLConfig(PreTrainedConfig):
    """The published config.json of ruGPT-3 XL; defaults are the 1.3B model's."""

    model_type = "rugpt3xl"

    vocab_size: int = 50264
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 8192
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    embedding_dropout: float | int = 0.1
    attention_dropout: float | int = 0.1
    output_dropout: float | int = 0.1
    use_cache: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = False
    sparse_mode: str = "none"
    sparse_block_size: int = 16
    sparse_num_local_blocks: int = 8
    sparse_num_global_blocks: int = 1
    sparse_num_different_global_patterns: int = 8

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_shape(self)


def _check_shape(config: RuGPT3XLConfig) -> None:
    """The limits DeepSpeed's FixedSparsityConfig enforces, said with the config key and the bad value."""
    if config.hidden_size % config.num_attention_heads:
        raise UsageError(f"hidden_size={config.hidden_size} must be divisible by "
                         f"num_attention_heads={config.num_attention_heads}")
    if config.sparse_mode not in SPARSE_MODES:
        raise UsageError(f"sparse_mode={config.sparse_mode!r} is not supported; use one of {', '.join(SPARSE_MODES)}")
    if config.sparse_mode == "none":
        return
    for key in ("sparse_block_size", "sparse_num_local_blocks", "sparse_num_global_blocks",
                "sparse_num_different_global_patterns"):
        if getattr(config, key) < 1:
            raise UsageError(f"{key}={getattr(config, key)} must be at least 1")
    local, global_ = config.sparse_num_local_blocks, config.sparse_num_global_blocks
    if local % global_:
        raise UsageError(f"sparse_num_local_blocks={local} must be divisible by sparse_num_global_blocks={global_}")
    if config.sparse_num_different_global_patterns > local // global_:
        raise UsageError(f"sparse_num_different_global_patterns={config.sparse_num_different_global_patterns} "
                         f"must be at most sparse_num_local_blocks / sparse_num_global_blocks = {local // global_}")


def sparse_layer_ids(config: RuGPT3XLConfig) -> frozenset[int]:
    """The layers that attend through the block-sparse layout; the others are dense (causal only)."""
    layers = range(config.num_hidden_layers)
    if config.sparse_mode == "all":
        return frozenset(layers)
    if config.sparse_mode == "alternating":  # as in ru-gpts: even layers sparse, odd ones dense
        return frozenset(i for i in layers if i % 2 == 0)
    return frozenset()


def fixed_sparsity_layout(num_heads: int, num_blocks: int, num_local_blocks: int, num_global_blocks: int,
                          num_patterns: int) -> torch.Tensor:
    """Which key blocks each query block may read, per head: bool [heads, blocks, blocks].

    DeepSpeed `FixedSparsityConfig.make_layout` (deepspeed/ops/sparse_attention/sparsity_config.py,
    `set_local_layout` + `set_global_layout`) with attention="unidirectional",
    horizontal_global_attention=False, different_layout_per_head=True; after Child et al. 2019, "Generating
    Long Sequences with Sparse Transformers", the "fixed" pattern. DeepSpeed builds it once for the longest
    sequence and slices it, so it is built here for all positions and indexed by position.
    """
    layout = torch.zeros(num_heads, num_blocks, num_blocks, dtype=torch.bool)
    # Local: aligned windows of num_local_blocks blocks, each block reading itself and earlier blocks of its window.
    for start in range(0, num_blocks, num_local_blocks):
        end = min(start + num_local_blocks, num_blocks)
        layout[:, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    # Global: head h reads, from every window, the num_global_blocks blocks that end (h % patterns) groups before
    # the window's end; every later query block reads them (vertical stripes starting at the diagonal).
    full_end = num_blocks - num_blocks % num_local_blocks
    for head in range(num_heads):
        first = num_local_blocks - (1 + head % num_patterns) * num_global_blocks
        for column in range(first, full_end, num_local_blocks):
            layout[head, column:, column:column + num_global_blocks] = True
        if full_end < num_blocks:  # a short last window: its global blocks at the same offset, kept inside
            column = min(full_end + first, num_blocks - num_global_blocks)
            layout[head, column:, column:column + num_global_blocks] = True
    return layout


class RuGPT3XLAttention(nn.Module):
    def __init__(self, config: RuGPT3XLConfig, layer_idx: int):
        super().__init__()
        width = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)
        self.attention_dropout = float(config.attention_dropout)
        self.resid_dropout = nn.Dropout(config.output_dropout)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # [B, H, T, D]
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # [B, H, past + T, D]
        # mask: bool [B, 1 or H, T, past + T], True where the query may read the key
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             dropout_p=self.attention_dropout if self.training else 0.0)
        return self.resid_dropout(self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)))


class RuGPT3XLMLP(nn.Module):
    def __init__(self, config: RuGPT3XLConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.output_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.act(self.up_proj(hidden_states))))


class RuGPT3XLBlock(GradientCheckpointingLayer):
    def __init__(self, config: RuGPT3XLConfig, layer_idx: int):
        super().__init__()
        self.sparse = layer_idx in sparse_layer_ids(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = RuGPT3XLAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = RuGPT3XLMLP(config)

    def forward(self, hidden_states: torch.Tensor, dense_mask: torch.Tensor, sparse_mask: torch.Tensor | None,
                cache: Cache | None = None, use_cache: bool = False) -> torch.Tensor:
        # Masks travel as positional arguments and the cache as `cache=`: under gradient checkpointing
        # GradientCheckpointingLayer drops the cache by that name.
        mask = sparse_mask if self.sparse else dense_mask
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), mask, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class RuGPT3XLPreTrainedModel(PreTrainedModel):
    config_class = RuGPT3XLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RuGPT3XLBlock"]
    _supports_sdpa = True  # attention always runs through torch's SDPA with an explicit mask


class RuGPT3XLModel(RuGPT3XLPreTrainedModel):
    """The transformer trunk: embeddings, blocks, final LayerNorm; returns hidden states."""

    def __init__(self, config: RuGPT3XLConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(RuGPT3XLBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # Built on first use per device, not a buffer: it is derived from the config, never saved or loaded.
        self._layouts: dict[str, torch.Tensor] = {}
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                past_key_values: Cache | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            given = "both" if input_ids is not None else "neither"
            raise ValueError(f"pass exactly one of input_ids and inputs_embeds (got {given})")
        cache = cache if cache is not None else past_key_values  # the name before transformers 5.x renamed it
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past = cache.get_seq_length() if cache is not None else 0
        key_positions = self._key_positions(attention_mask, inputs_embeds.shape[:2], past, inputs_embeds.device)
        if position_ids is None:
            position_ids = key_positions[:, past:]
        hidden_states = self.embed_dropout(inputs_embeds + self.embed_positions(position_ids))
        dense_mask, sparse_mask = self._masks(attention_mask, position_ids, key_positions, past)
        for block in self.layers:
            hidden_states = block(hidden_states, dense_mask, sparse_mask, cache=cache, use_cache=use_cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       **{_CACHE_FIELD: cache if use_cache else None})

    @staticmethod
    def _key_positions(attention_mask: torch.Tensor | None, batch_length: tuple[int, int], past: int,
                       device: torch.device) -> torch.Tensor:
        """Position of every key (cached and new): [B or 1, past + T]; padding does not advance it."""
        batch, length = batch_length
        if attention_mask is None:
            return torch.arange(past + length, device=device).unsqueeze(0)
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, past + length):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not fit: expected "
                             f"[batch, cached + new tokens] = [{batch}, {past + length}] of 1 (token) and 0 (padding)")
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def _masks(self, attention_mask: torch.Tensor | None, query_positions: torch.Tensor,
               key_positions: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bool attention masks, True = may read: dense [B, 1, T, K] and, where layers need it, sparse [B, H, T, K]."""
        length, keys = query_positions.shape[-1], key_positions.shape[-1]
        device = key_positions.device
        query_index = torch.arange(past, past + length, device=device).unsqueeze(1)
        key_index = torch.arange(keys, device=device).unsqueeze(0)
        allowed = (key_index <= query_index).unsqueeze(0)  # [1, T, K] causal by order
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool().unsqueeze(1)  # padding keys are never read
        # Each query may read itself: real tokens do anyway; a padding query would otherwise read nothing and
        # SDPA would return NaN for it (its output is never used).
        itself = (key_index == query_index).unsqueeze(0)
        dense = (allowed | itself).unsqueeze(1)
        if not any(block.sparse for block in self.layers):
            return dense, None
        block = self.config.sparse_block_size
        layout = self._layout(device)
        last = layout.shape[-1] - 1
        query_blocks = (query_positions // block).clamp(max=last).unsqueeze(-1)  # [B or 1, T, 1]
        key_blocks = (key_positions // block).clamp(max=last).unsqueeze(-2)  # [B or 1, 1, K]
        readable = layout[:, query_blocks, key_blocks].transpose(0, 1)  # [B, H, T, K]
        return dense, (allowed.unsqueeze(1) & readable) | itself.unsqueeze(1)

    def _layout(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._layouts:
            config = self.config
            blocks = -(-config.max_position_embeddings // config.sparse_block_size)
            self._layouts[key] = fixed_sparsity_layout(
                config.num_attention_heads, blocks, config.sparse_num_local_blocks, config.sparse_num_global_blocks,
                config.sparse_num_different_global_patterns).to(device)
        return self._layouts[key]


class RuGPT3XLForCausalLM(RuGPT3XLPreTrainedModel, GenerationMixin):
    """ruGPT-3 XL with its (untied) language-model head; `labels` give the shifted next-token loss."""

    def __init__(self, config: RuGPT3XLConfig):
        super().__init__(config)
        self.model = RuGPT3XLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                past_key_values: Cache | None = None, **kwargs) -> CausalLMOutputWithPast:
        trunk = self.model(input_ids=input_ids, cache=cache if cache is not None else past_key_values,
                           attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                           use_cache=use_cache)
        hidden_states = trunk.last_hidden_state
        # generate asks for the last position only (logits_to_keep=1); 0 keeps them all
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(trunk, _CACHE_FIELD)})
