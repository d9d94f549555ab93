"""rugpt: Russian GPT language models at work — load, generate, score, fine-tune, prompt-tune, serve."""

from rugpt.errors import DataError, ModelNotFound, RugptError, UsageError
from rugpt.generation import GenerationResult, GenerationSettings, Generator, generate
from rugpt.models import LoadedModel, list_models, load

__all__ = [
    "DataError",
    "GenerationResult",
    "GenerationSettings",
    "Generator",
    "LoadedModel",
    "ModelNotFound",
    "RugptError",
    "UsageError",
    "generate",
    "list_models",
    "load",
]
__version__ = "0.1.0"
