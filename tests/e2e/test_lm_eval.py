"""lm-evaluation-harness scores a likelihood task through `rugpt serve`: its `local-completions` model against a live
server on 127.0.0.1 with the bundled model, on a tiny Russian multiple-choice task defined on local data.

What lm-eval sends for a likelihood is what this checks end to end: token-id prompts, `echo`, `logprobs: 1`,
`max_tokens: 1`; it sums the echoed continuation's log-probs and compares each with its top-1 (is_greedy).
"""

import csv
import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the `eval` extra: pip install 'rugpt[eval]'")
from _serve_helpers import live_server  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402

CEDR = SHARED_DATA / "emotions" / "cedr-train.csv"
EMOTIONS = ["радость", "грусть", "удивление", "страх", "злость"]  # CEDR's labels 0..4, in order
TASK = """task: rugpt_cedr_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Текст: {{{{text}}}}\\nЭмоция:"
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
"""


def tiny_task(folder, per_label: int = 2) -> list[dict]:
    """A few CEDR sentences with exactly one emotion, as an lm-eval YAML task in `folder`; the docs."""
    docs, counts = [], {}
    with CEDR.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            labels = row["labels"].strip("[]").split()
            if len(labels) == 1 and counts.get(labels[0], 0) < per_label and len(row["text"]) < 200:
                counts[labels[0]] = counts.get(labels[0], 0) + 1
                docs.append({"text": row["text"], "label": int(labels[0])})
    data = folder / "cedr.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (folder / "rugpt_cedr_tiny.yaml").write_text(
        TASK.format(data=data, choices=json.dumps(EMOTIONS, ensure_ascii=False)), encoding="utf-8")
    return docs


def reference_loglikelihood(loaded, context: str, continuation: str) -> float:
    """The continuation's log-likelihood as lm-eval splits the pair (context tokens, then the rest), straight
    from the model's logits."""
    tokenizer = loaded.tokenizer
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logprobs = torch.log_softmax(loaded.model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logprobs[p - 1, whole[p]]) for p in range(start, len(whole)))


@pytest.mark.slow
@pytest.mark.integration
def test_lm_eval_scores_a_russian_multiple_choice_task_through_the_server(bundled, tmp_path):
    if not CEDR.exists():
        pytest.skip(f"the shared data folder is absent ({CEDR})")
    from lm_eval.tasks import TaskManager

    from rugpt.models import BUNDLED_DIR
    from rugpt.serve import ServerSettings, create_app

    docs = tiny_task(tmp_path)
    app = create_app(ServerSettings(max_batch=4, shutdown_grace=1.0), loaded=bundled)
    with live_server(app) as url:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": app.state.service.model_id, "base_url": f"{url}/v1/completions",
                        "tokenizer": str(BUNDLED_DIR), "tokenizer_backend": "huggingface",
                        "max_length": bundled.context_length, "num_concurrent": 1, "max_retries": 1},
            tasks=["rugpt_cedr_tiny"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    accuracy = results["results"]["rugpt_cedr_tiny"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    samples = results["samples"]["rugpt_cedr_tiny"]
    assert len(samples) == len(docs) == 10
    for sample in samples:
        context = f"Текст: {sample['doc']['text']}\nЭмоция:"
        for emotion, response in zip(EMOTIONS, sample["resps"], strict=True):
            loglikelihood, _is_greedy = response[0]
            # lm-eval puts its target delimiter, a space, between the context and each choice
            assert loglikelihood == pytest.approx(reference_loglikelihood(bundled, context, " " + emotion), abs=1e-3)
