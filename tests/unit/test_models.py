import pytest
import torch

from rugpt.errors import ModelNotFound, UsageError
from rugpt.models import BUNDLED_DIR, find_spec, list_models, load, pick_dtype, resolve


def test_aliases_and_old_hub_ids_resolve():
    assert resolve("small") == "ai-forever/rugpt3small_based_on_gpt2"
    assert resolve("LARGE") == "ai-forever/rugpt3large_based_on_gpt2"
    assert find_spec("sberbank-ai/rugpt3large_based_on_gpt2").alias == "large"
    assert resolve(None) == str(BUNDLED_DIR)
    assert resolve("tiny") == str(BUNDLED_DIR)


def test_xl_resolves_to_the_transformers_conversion():
    # ai-forever/rugpt3xl holds only the Megatron checkpoint; the community conversion has config and safetensors.
    assert resolve("xl") == "evilfreelancer/ruGPT3XL"


@pytest.mark.parametrize("megatron", ["ai-forever/rugpt3xl", "sberbank-ai/rugpt3xl"])
def test_the_megatron_xl_repo_points_to_the_conversion(megatron):
    with pytest.raises(UsageError, match="only ruGPT-3 XL's Megatron checkpoint.*'xl' \\(evilfreelancer/ruGPT3XL"):
        resolve(megatron)


def test_unknown_alias_lists_what_is_allowed():
    with pytest.raises(ModelNotFound, match="unknown model 'huge'.*small"):
        resolve("huge")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve(str(tmp_path / "nope"))


def test_uncached_hub_model_offline_gives_one_sentence():
    with pytest.raises(ModelNotFound) as info:
        load("medium")
    message = str(info.value)
    assert "ai-forever/rugpt3medium_based_on_gpt2" in message and "offline" in message
    assert "\n" not in message


def config_only(tiny_model_dir, folder):
    """A folder with the tiny model's config and tokenizer but no weights."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    return folder


def test_folder_with_an_empty_bin_is_refused(tmp_path, tiny_model_dir):
    folder = config_only(tiny_model_dir, tmp_path / "pickled")
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelNotFound, match="holds no tensors"):
        load(str(folder))


def test_folder_without_weights_is_refused(tmp_path, tiny_model_dir):
    folder = config_only(tiny_model_dir, tmp_path / "bare")
    with pytest.raises(ModelNotFound, match="has no weights: expected model.safetensors"):
        load(str(folder))


def test_checkpoint_missing_tensors_is_refused_not_filled_with_random_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    folder = config_only(tiny_model_dir, tmp_path / "partial")
    state = load_file(tiny_model_dir / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelNotFound, match=r"lacks weights: transformer\.h\.1\.mlp\.c_fc\.weight"):
        load(str(folder))


def test_load_folder_sets_padding_and_context(tiny):
    assert tiny.tokenizer.pad_token_id == tiny.tokenizer.eos_token_id
    assert tiny.context_length == 128
    assert tiny.device == "cpu"
    assert next(tiny.model.parameters()).dtype == torch.float32
    assert not tiny.model.training


def test_dtype_choices():
    assert pick_dtype(None, "cpu") == torch.float32
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(UsageError, match="dtype='int3'"):
        pick_dtype("int3", "cpu")


def test_list_models_covers_the_family_and_reports_availability():
    rows = {r["alias"]: r for r in list_models()}
    assert {"tiny", "small", "medium", "large", "xl", "13b"} <= set(rows)
    assert rows["small"]["available"] == "no"  # nothing is in the test machine's HF cache
    assert rows["xl"]["context"] == 2048
