"""transformers Trainer callbacks for prompt tuning (ruprompts.callbacks).

    trainer = Trainer(model=model, ..., data_collator=preprocessor.collate_fn(),
                      callbacks=[FreezeTransformerUnfreezePrompt(), ReduceCheckpoint(), SavePretrainedPrompt(prompt)])

They find the prompt's parameters by name: every parameter of a patched model whose name holds
"prompt_provider" (`transformer.wte.prompt_provider.weights`). Checkpoints are model.safetensors under
transformers 5 (pytorch_model.bin before); ReduceCheckpoint handles both, reading a .bin only through
torch's weights-only loader.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from rugpt.prompts.errors import PromptUsageError
from rugpt.prompts.prompt import Prompt
from rugpt.prompts.prompt_embedding import PROMPT_PROVIDER_KEY_NAME


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


class FreezeTransformerUnfreezePrompt(TrainerCallback):
    """Freezes all parameters but those of the prompt provider when training begins."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        for name, param in model.named_parameters():
            param.requires_grad = PROMPT_PROVIDER_KEY_NAME in name


class ReduceCheckpoint(TrainerCallback):
    """Reduces each checkpoint to the prompt provider's weights: the frozen model is not saved again and again."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        folder = _checkpoint_dir(args, state)
        if (folder / SAFE_WEIGHTS_NAME).is_file():
            from safetensors.torch import load_file, save_file

            path = folder / SAFE_WEIGHTS_NAME
            weights = {k: v for k, v in load_file(str(path)).items() if PROMPT_PROVIDER_KEY_NAME in k}
            save_file(weights, str(path), metadata={"format": "pt"})
        elif (folder / WEIGHTS_NAME).is_file():
            import torch

            from rugpt.prompts.compat import read_tensor_file

            path = folder / WEIGHTS_NAME
            state_dict = read_tensor_file(path)
            torch.save({k: v for k, v in state_dict.items() if PROMPT_PROVIDER_KEY_NAME in k}, path)


class SavePretrainedPrompt(TrainerCallback):
    """Saves the prompt with `Prompt.save_pretrained` into each checkpoint folder.

    Args:
        prompt: the prompt being trained.
    """

    def __init__(self, prompt: Prompt):
        self.prompt = prompt

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.prompt.save_pretrained(_checkpoint_dir(args, state))


class WBLogHydraConfig(TrainerCallback):
    """Logs a Hydra config to Weights and Biases when training begins (needs omegaconf and wandb).

    Args:
        cfg: the omegaconf.DictConfig to log.
    """

    def __init__(self, cfg):
        try:
            import omegaconf
            import wandb
        except ImportError:
            raise PromptUsageError("WBLogHydraConfig is not available: install hydra and wandb with "
                                   "`pip install hydra-core wandb`") from None
        self._omegaconf, self._wandb, self.cfg = omegaconf, wandb, cfg

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._wandb.config.update({"hydra": self._omegaconf.OmegaConf.to_container(self.cfg)})


__all__ = ["FreezeTransformerUnfreezePrompt", "ReduceCheckpoint", "SavePretrainedPrompt", "WBLogHydraConfig"]
