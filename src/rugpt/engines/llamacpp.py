"""The llama.cpp engine: a GPT-2 checkpoint converted to GGUF, run by llama.cpp through llama-cpp-python.

Why: at batch 1 a decode step reads every weight once, and llama.cpp's CPU kernels for f16 and 8-bit
(q8_0) weights stream them fast, where torch's bf16 and int8 matrix-vector kernels are slow on a CPU.

One llama.cpp context holds every row: a row is a sequence id, so a step over several rows is one
`llama_decode` call on one batch (each token with its own position and sequence), and releasing a
row removes that sequence's cells from the KV cache. Token ids come from rugpt's tokenizer; only
logits come back, as float32 torch tensors, so rugpt's sampler picks tokens the same on every engine.
Prompt embeddings (trained prompts) cannot be passed in: `accepts_embeds` is False, and
`create_engine` falls back to the transformers engine for a model whose embeddings are patched.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from pathlib import Path

import numpy as np
import torch

from rugpt.engines.base import DecodeEngine
from rugpt.engines.gguf_convert import GGUFType, convert
from rugpt.errors import UsageError

log = logging.getLogger(__name__)
INSTALL_HINT = "the llama.cpp engines need llama-cpp-python and gguf: pip install 'rugpt[llamacpp]'"
_log_callback = None  # kept alive for as long as llama.cpp may call it


def import_llama_cpp():
    """The llama_cpp module, or a UsageError saying how to install it."""
    try:
        import gguf  # noqa: F401  (the converter needs it; fail before any work)
        import llama_cpp
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    _route_logs(llama_cpp)
    return llama_cpp


def _route_logs(llama_cpp) -> None:
    """Send llama.cpp's console chatter (model loading, buffer sizes) to this module's logger."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data) -> None:
        message = text.decode("utf-8", "replace").rstrip()
        if message:  # ggml's levels: 1 debug, 2 info, 3 warn (benign here: context padding), 4 error
            log.log(logging.WARNING if level == 4 else logging.DEBUG, "llama.cpp: %s", message)

    _log_callback = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


class LlamaCppEngine(DecodeEngine):
    """Rows decoded together by llama.cpp over one GGUF file; weights f32, f16 or q8_0."""

    accepts_embeds = False

    def __init__(self, gguf_path: str | Path, context_length: int, max_rows: int = 16, threads: int | None = None,
                 f32_cache: bool = False):
        llama_cpp = import_llama_cpp()
        self._lib = llama_cpp
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not model:
            raise UsageError(f"llama.cpp could not load {str(gguf_path)!r} (see the log for why)")
        vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        super().__init__(context_length, vocab_size, max_rows)
        ctx = llama_cpp.llama_init_from_model(model, self._context_params(threads, f32_cache))
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise RuntimeError("llama.cpp could not create a context (see the log for why)")
        # A prefill puts a whole prompt in one batch; a step puts one token per row.
        self._capacity = max(context_length, max_rows)
        batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        self._model, self._ctx, self._batch = model, ctx, batch
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._seq_of: dict[int, int] = {}
        self._free_seqs = list(range(max_rows - 1, -1, -1))
        self._finalizer = weakref.finalize(self, _free, llama_cpp, model, ctx, batch)

    def _context_params(self, threads: int | None, f32_cache: bool):
        llama_cpp = self._lib
        params = llama_cpp.llama_context_default_params()
        # One KV stream per row (kv_unified off): each row has the model's full context, and a row's
        # attention reads only its own cells.
        params.n_ctx = self.context_length * self.max_rows
        params.n_seq_max = self.max_rows
        params.kv_unified = False
        params.n_batch = max(self.context_length, self.max_rows)
        params.n_ubatch = min(params.n_batch, 512)
        params.n_threads = params.n_threads_batch = threads or torch.get_num_threads()
        params.no_perf = True
        if f32_cache:  # the exact engine keeps keys and values in f32, as transformers does
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        return params

    def close(self) -> None:
        """Free llama.cpp's model and context now rather than when the engine is collected."""
        self._finalizer()

    def _prefill(self, row: int, token_ids: list[int], embeds: torch.Tensor | None) -> torch.Tensor:
        if not self._free_seqs:  # cannot happen while base.prefill checks max_rows; kept as a guard
            raise UsageError(f"engine holds max_rows={self.max_rows} rows already; release one first")
        seq = self._free_seqs.pop()
        self._seq_of[row] = seq
        try:
            return self._decode([(seq, token_ids, 0)])[0]
        except BaseException:
            self._release_seq(row)
            raise

    def _step(self, rows: list[int], token_ids: list[int]) -> torch.Tensor:
        entries = [(self._seq_of[row], [token], self.lengths[row]) for row, token in zip(rows, token_ids, strict=True)]
        return self._decode(entries)

    def _extend(self, row: int, token_ids: list[int], all_logits: bool) -> torch.Tensor:
        logits = self._decode([(self._seq_of[row], token_ids, self.lengths[row])], all_logits)
        return logits if all_logits else logits[0]

    def _truncate(self, row: int, length: int) -> None:
        if not self._lib.llama_memory_seq_rm(self._memory, self._seq_of[row], length, -1):
            raise UsageError(f"engine {self.name!r} could not drop the tokens of row {row} after {length}")

    def _release(self, row: int) -> None:
        self._release_seq(row)

    def _release_seq(self, row: int) -> None:
        seq = self._seq_of.pop(row)
        self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._free_seqs.append(seq)

    def _decode(self, entries: list[tuple[int, list[int], int]], all_logits: bool = False) -> torch.Tensor:
        """Run (sequence, tokens, first position) entries in one batch; logits of each entry's last token, or
        of every token when `all_logits`."""
        batch = self._batch
        i = 0
        for seq, tokens, start in entries:
            for offset, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + offset
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = all_logits or offset == len(tokens) - 1
                i += 1
        batch.n_tokens = i
        status = self._lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} on a batch of {i} tokens")
        pointer = self._lib.llama_get_logits(self._ctx)
        outputs = i if all_logits else len(entries)  # llama.cpp returns logits of the marked tokens, in order
        logits = np.ctypeslib.as_array(pointer, shape=(outputs, self.vocab_size))
        return torch.from_numpy(logits.copy())


def _free(llama_cpp, model, ctx, batch) -> None:
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


def create_llamacpp_engine(loaded, gguf_type: GGUFType | str, max_rows: int = 16, name: str = "") -> LlamaCppEngine:
    """A llama.cpp engine over `loaded`'s checkpoint, converted to GGUF on first use (then cached).

    It runs the checkpoint as saved in its folder, not weights changed in memory after loading.
    """
    import_llama_cpp()
    gguf_type = GGUFType(gguf_type)
    from rugpt.models import checkpoint_folder

    folder = loaded.folder or checkpoint_folder(loaded.name, loaded.source)
    path = convert(folder, gguf_type, tokenizer=loaded.tokenizer)
    engine = LlamaCppEngine(path, loaded.context_length, max_rows, f32_cache=gguf_type == GGUFType.f32)
    engine.name = name or f"llamacpp-{gguf_type.value}"
    return engine


def create_gguf_engine(loaded, requested: GGUFType | str | None = None, max_rows: int = 16) -> LlamaCppEngine:
    """A llama.cpp engine over a GGUF model's own file (`loaded.gguf_path`), run as it is.

    A file's quantization was chosen when it was made: asked for another type (`llamacpp-q8` on a
    Q4_K_M file), the file still runs as it is, with a log line, since requantizing would only lose more.
    """
    import_llama_cpp()
    stored = loaded.weight_type  # 'f32', 'q8_0', 'q4_k_m', ...; None if the file does not say
    if requested is not None and GGUFType(requested).value != stored:
        log.warning("%s holds %s weights; llama.cpp runs the file as it is, not as %s",
                    loaded.gguf_path, stored or "unstated", GGUFType(requested).value)
    # An all-f32 file asks for exactness, so the KV cache stays f32 too, as for llamacpp-f32.
    engine = LlamaCppEngine(loaded.gguf_path, loaded.context_length, max_rows, f32_cache=stored == "f32")
    engine.name = f"llamacpp-{stored or 'gguf'}"
    return engine
