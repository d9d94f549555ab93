"""rugpt: Russian GPT language models at work — load, generate, score, fine-tune, prompt-tune, serve.

Names are imported on first use, so `import rugpt` (and the CLI) starts without loading torch.

Plan a fine-tuning run before loading anything (`rugpt finetune ... --plan`): what fits the memory
budget and its estimated peak, from the model's config alone:

    import rugpt
    plan = rugpt.plan_finetune("poems.txt", "runs/poems", "large", max_memory="16GB")
    print(plan.describe())          # micro-batch, checkpointing, optimizer, estimated peak by part
    rugpt.finetune("poems.txt", "runs/poems", "large", max_memory="16GB")   # runs that plan
"""

from __future__ import annotations

import importlib

from rugpt.errors import DataError, ModelNotFound, RugptError, UsageError

_LAZY = {
    "Chat": "rugpt.apps.chat",
    "ChatSettings": "rugpt.apps.chat",
    "Classifier": "rugpt.classification",
    "ClassifierSettings": "rugpt.classification",
    "FinetuneResult": "rugpt.training.finetune",
    "FinetuneSettings": "rugpt.training.settings",
    "GenerationResult": "rugpt.generation",
    "GenerationSettings": "rugpt.generation",
    "Generator": "rugpt.generation",
    "LoadedModel": "rugpt.models",
    "Recommender": "rugpt.apps.recommender",
    "RecommenderSettings": "rugpt.apps.recommender",
    "ScoreSettings": "rugpt.scoring",
    "Scorer": "rugpt.scoring",
    "TrainingPlan": "rugpt.training.plan",
    "classify": "rugpt.classification",
    "download": "rugpt.download",
    "finetune": "rugpt.training.finetune",
    "generate": "rugpt.generation",
    "list_models": "rugpt.models",
    "load": "rugpt.models",
    "plan_finetune": "rugpt.training.finetune:plan",  # `rugpt finetune --plan`: a TrainingPlan, no weights loaded
    "play": "rugpt.apps.adventure.terminal",
    "prompt_tune": "rugpt.prompts.training",
    "read_jsonl": "rugpt.jsonl",
    "recommend": "rugpt.apps.recommender",
    "score": "rugpt.scoring",
}

__all__ = ["DataError", "ModelNotFound", "RugptError", "UsageError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        module, _, attribute = _LAZY[name].partition(":")  # "module:attribute" where the names differ
        value = getattr(importlib.import_module(module), attribute or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rugpt' has no attribute {name!r}")
