import torch

from rugpt.engines.memory import release_file_pages
from rugpt.models import load


def test_pages_of_a_mapped_safetensors_weight_are_given_back_and_still_read_the_same(tiny_model_dir):
    weight = load(str(tiny_model_dir), device="cpu").model.transformer.wte.weight.data
    before = weight.clone()
    assert release_file_pages(weight)
    assert torch.equal(weight, before)  # read back from the file


def test_memory_not_from_a_file_is_left_alone():
    tensor = torch.ones(1 << 20)
    assert not release_file_pages(tensor)
    assert bool((tensor == 1).all())
