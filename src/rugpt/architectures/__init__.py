"""Model architectures that transformers does not ship, written in rugpt so no checkpoint's own code ever runs.

`register()` makes `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` resolve these model types to rugpt's
classes. A folder whose config.json names a registered `model_type` then loads with `trust_remote_code=False`,
even when its config carries an `auto_map` pointing at Python files of its own: transformers prefers a
registered local class and never imports those files (rugpt3xl.py's docstring says how this was checked).
"""

from __future__ import annotations

MODEL_TYPES = ("rugpt3xl",)


def register() -> None:
    """Register rugpt's architectures with transformers' Auto classes; safe to call any number of times."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from rugpt.architectures.rugpt3xl import RuGPT3XLConfig, RuGPT3XLForCausalLM, RuGPT3XLModel

    AutoConfig.register(RuGPT3XLConfig.model_type, RuGPT3XLConfig, exist_ok=True)
    AutoModel.register(RuGPT3XLConfig, RuGPT3XLModel, exist_ok=True)
    AutoModelForCausalLM.register(RuGPT3XLConfig, RuGPT3XLForCausalLM, exist_ok=True)
