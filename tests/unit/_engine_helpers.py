"""Driving a decode engine by hand, shared by the engine tests."""

import torch


def prompt_ids(tiny, text="Мой дядя самых честных правил"):
    return tiny.tokenizer(text)["input_ids"]


def run_tokens(engine, ids, continuation):
    """Prefill `ids`, then feed `continuation` token by token; the logits of every step."""
    row, logits = engine.prefill(ids)
    out = [logits]
    for token in continuation:
        out.append(engine.step([row], [token])[0])
    engine.release(row)
    return torch.stack(out)
