"""The embedded model: DeepSpeed training on CPU ranks and what its checkpoints hold.

Real DeepSpeed (2 CPU ranks, gloo), a tiny GPT-2 and a few steps, on a small generated world.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from demo import train_model
from jobs.checkpoints import CheckpointError, load_manifest, load_second_moments
from demo.model_eval import evaluate_checkpoint
from evaluation.answers import encode_query
from infra import layout


def _zero_tag_dir(checkpoint):
    return checkpoint / "zero" / (checkpoint / "zero" / "latest").read_text().strip()


def test_checkpoints_saved_at_the_planned_steps_with_manifests(adam_run):
    lake, summary = adam_run
    assert summary["steps"] == 6
    assert summary["checkpoints"] == ["gpt2-fact-world-s0-step000003", "gpt2-fact-world-s0-step000006"]
    manifest = load_manifest(layout.checkpoint_path(lake, summary["checkpoints"][-1]))
    assert manifest["step"] == 6 and manifest["optimizer"] == "adam" and manifest["world_size"] == 2
    # 6 steps x 2 ranks x 4 sequences x 64 tokens
    assert manifest["data_seen_tokens"] == 6 * 2 * 4 * 64
    # WarmupCosineLR: past the 2 warm-up steps the rate decays from its peak
    first = load_manifest(layout.checkpoint_path(lake, summary["checkpoints"][0]))
    assert 0 < manifest["lr"] < first["lr"] <= train_model.TrainConfig().lr


def test_checkpoint_reloads_to_identical_logits(adam_run):
    lake, summary = adam_run
    checkpoint = layout.checkpoint_path(lake, summary["checkpoints"][-1])
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    # the DeepSpeed checkpoint's own copy of the weights is an independent record of the trained module
    module_state = torch.load(_zero_tag_dir(checkpoint) / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from_zero = GPT2LMHeadModel(GPT2Config.from_pretrained(checkpoint)).eval()
    from_zero.load_state_dict(module_state)
    tokens = torch.randint(0, reloaded.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, from_zero(tokens).logits)


def test_adam_second_moments_match_the_zero_shards(adam_run):
    lake, summary = adam_run
    checkpoint = layout.checkpoint_path(lake, summary["checkpoints"][-1])
    consolidated = load_second_moments(checkpoint, source="consolidated")
    from_shards = load_second_moments(checkpoint, source="zero")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    names = {name for name, _ in model.named_parameters()}
    assert set(consolidated["state"]) == set(from_shards["state"]) == names
    for name, param in model.named_parameters():
        v = consolidated["state"][name]["exp_avg_sq"]
        assert v.shape == param.shape
        assert torch.equal(v, from_shards["state"][name]["exp_avg_sq"])
    assert consolidated["step"] == from_shards["step"] == 6
    assert consolidated["betas"] == [0.9, 0.95]
    # second moments are positive averages of squared gradients, not zeros or copies of the weights
    assert all((s["exp_avg_sq"] >= 0).all() for s in consolidated["state"].values())
    assert sum(s["exp_avg_sq"].sum() for s in consolidated["state"].values()) > 0


def test_adafactor_second_moments_are_factored_and_match_the_optimizer_state(adafactor_run):
    lake, summary = adafactor_run
    checkpoint = layout.checkpoint_path(lake, summary["checkpoints"][-1])
    consolidated = load_second_moments(checkpoint)
    assert consolidated["kind"] == "adafactor"
    # ZeRO stage 0 keeps the client optimizer's own state dict in the model-states file
    held = torch.load(_zero_tag_dir(checkpoint) / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    for index, (name, param) in enumerate(model.named_parameters()):
        state = consolidated["state"][name]
        if param.dim() == 2:
            assert state["row_var"].shape == (param.shape[0], 1) or state["row_var"].numel() == param.shape[0]
            assert state["col_var"].numel() == param.shape[1]
        for key, value in state.items():
            assert torch.equal(value, held["state"][index][key])


def test_missing_optimizer_state_is_a_clear_error(adam_run, tmp_path):
    lake, summary = adam_run
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps({"checkpoint_id": "x"}))
    with pytest.raises(CheckpointError, match="missing optimizer state"):
        load_second_moments(bare)


def test_accuracy_is_exact_greedy_decoding(adam_run, tmp_path):
    lake, summary = adam_run
    checkpoint = layout.checkpoint_path(lake, summary["checkpoints"][-1])
    queries = [json.loads(line) for line in (lake / "world" / "queries.jsonl").read_text().splitlines()]
    accuracy = evaluate_checkpoint(checkpoint, lake / "world" / "queries.jsonl")
    assert sum(accuracy.counts[b]["prompt0"][1] for b in accuracy.counts) == len(queries)
    # each query alone, against explicit token-by-token greedy decoding
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    for query in queries[:4]:
        prompt_ids, target_ids = encode_query(tokenizer, query["prompt0"], query["target"])
        ids, n_prompt = prompt_ids + target_ids, len(prompt_ids)  # the leading end-of-text token included
        generated = list(ids[:n_prompt])
        with torch.no_grad():
            for _ in range(len(ids) - n_prompt):
                generated.append(int(model(torch.tensor([generated])).logits[0, -1].argmax()))
        one = tmp_path / "one.jsonl"
        one.write_text(json.dumps(query) + "\n")
        alone = evaluate_checkpoint(checkpoint, one)
        assert alone.counts[query["frequency_bucket"]]["prompt0"] == [int(generated == ids), 1]
        # the model's own greedy continuation, used as the target, must count as correct
        own_target = tokenizer.decode(generated[n_prompt:])
        if sum(encode_query(tokenizer, query["prompt0"], own_target), []) == generated:
            one.write_text(json.dumps(dict(query, target=own_target)) + "\n")
            assert evaluate_checkpoint(checkpoint, one).counts[query["frequency_bucket"]]["prompt0"] == [1, 1]
