"""Fast checks of the offline demo language model pieces (stories, tokenizer, data, model)."""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import default_data_collator  # noqa: E402

from manager_daemon.demo.lm import (  # noqa: E402
    DEMO_RECIPE,
    build_datasets,
    build_model,
    prepare,
    train_tokenizer,
    training_arguments,
)
from manager_daemon.demo.stories import generate_stories  # noqa: E402


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return generate_stories(40, seed=3)


@pytest.fixture(scope="module")
def tokenizer(texts: list[str]):
    return train_tokenizer(texts, vocab_size=400)


def test_stories_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    first = generate_stories(20, seed=7)
    assert first == generate_stories(20, seed=7)
    other = generate_stories(20, seed=8)
    assert first != other
    assert len(set(first)) == 20
    assert generate_stories(5, seed=7) == first[:5]


def test_stories_look_like_short_childrens_stories() -> None:
    stories = generate_stories(200, seed=0)
    for story in stories:
        assert 50 <= len(story.split()) <= 120
        assert "{" not in story and "}" not in story
        assert story.endswith(".")
    # Templates are varied enough that openings are far from all alike.
    assert len({story.split(".")[0] for story in stories}) > 150


def test_tokenizer_round_trips_and_uses_eos_as_pad(tokenizer, texts: list[str]) -> None:
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == 400
    for text in [*texts[:3], "An unseen word: zebra-quokka 42 ünïcode!"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.eos_token_id not in ids
        assert tokenizer.decode(ids) == text
    # Merges learned on the corpus make its text much shorter than one token per byte.
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert len(ids) < len(texts[0].encode()) / 2


def test_datasets_yield_fixed_blocks_with_labels_equal_to_inputs(
    tokenizer, texts: list[str]
) -> None:
    train, evaluation = build_datasets(tokenizer, texts[:30], texts[30:], block_size=32)
    n_tokens = len(
        tokenizer(tokenizer.eos_token.join(texts[:30]) + tokenizer.eos_token)["input_ids"]
    )
    assert len(train) == n_tokens // 32
    assert 0 < len(evaluation) < len(train)
    for dataset in (train, evaluation):
        item = dataset[len(dataset) - 1]
        assert set(item) == {"input_ids", "labels"}
        assert item["input_ids"].dtype == torch.long
        assert item["input_ids"].shape == (32,)
        assert torch.equal(item["input_ids"], item["labels"])
    # Stories are separated by eos, so block boundaries cross story boundaries.
    assert (train.blocks == tokenizer.eos_token_id).sum() >= 29
    batch = default_data_collator([train[0], train[1]])
    assert batch["input_ids"].shape == (2, 32)


def test_model_forward_gives_finite_loss(tokenizer, texts: list[str]) -> None:
    train, _ = build_datasets(tokenizer, texts[:30], texts[30:], block_size=32)
    model = build_model(
        tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=32, dropout=0.1, seed=0
    )
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.1
    model.eval()
    batch = default_data_collator([train[i] for i in range(4)])
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 32, len(tokenizer))
    loss = out.loss.item()
    # An untrained model is close to uniform over the vocabulary.
    assert math.isfinite(loss)
    assert abs(loss - math.log(len(tokenizer))) < 1.0


def test_build_model_is_seeded(tokenizer) -> None:
    kwargs = dict(n_layer=1, n_embd=16, n_head=2, n_positions=16, dropout=0.0)
    a = build_model(tokenizer, seed=1, **kwargs)
    b = build_model(tokenizer, seed=1, **kwargs)
    c = build_model(tokenizer, seed=2, **kwargs)
    weight = "transformer.wte.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_prepare_builds_a_consistent_run() -> None:
    recipe = dataclasses.replace(
        DEMO_RECIPE, n_train_stories=20, n_eval_stories=30, block_size=32, n_embd=32, n_head=2
    )
    prepared = prepare(recipe, seed=5)
    assert len(prepared.tokenizer) == recipe.vocab_size
    assert prepared.model.config.n_positions == recipe.block_size
    assert len(prepared.eval_dataset) > len(prepared.train_dataset) > 0
    assert prepared.train_dataset[0]["input_ids"].shape == (recipe.block_size,)
    # Train and eval stories come from different seeds, so the splits do not overlap.
    assert not torch.equal(prepared.train_dataset.blocks[0], prepared.eval_dataset.blocks[0])


def test_training_arguments_follow_the_recipe(tmp_path) -> None:
    args = training_arguments(DEMO_RECIPE, str(tmp_path))
    assert args.eval_strategy == "steps"
    assert args.eval_steps == DEMO_RECIPE.eval_steps
    assert args.logging_steps == DEMO_RECIPE.logging_steps
    assert args.learning_rate == DEMO_RECIPE.learning_rate
    assert args.weight_decay == DEMO_RECIPE.weight_decay
    assert args.max_steps == DEMO_RECIPE.max_steps
    assert args.per_device_train_batch_size == DEMO_RECIPE.per_device_train_batch_size
    assert args.lr_scheduler_type == DEMO_RECIPE.lr_scheduler_type
    assert args.seed == DEMO_RECIPE.seed
    assert args.report_to == [] or args.report_to == "none"
    assert args.save_strategy == "no"
    assert args.use_cpu and args.disable_tqdm
    assert args.dataloader_num_workers == 0
    assert args.output_dir == str(tmp_path)


def test_training_arguments_pass_overrides_through(tmp_path) -> None:
    args = training_arguments(DEMO_RECIPE, str(tmp_path), report_to="mlflow", eval_steps=7)
    assert args.eval_steps == 7
    assert "mlflow" in args.report_to


def test_demo_recipe_overfits_by_design() -> None:
    recipe = DEMO_RECIPE
    assert recipe.dropout == 0.0 and recipe.weight_decay == 0.0
    assert recipe.n_eval_stories > recipe.n_train_stories
    assert recipe.max_steps // recipe.eval_steps >= 12
    assert recipe.n_embd % recipe.n_head == 0
