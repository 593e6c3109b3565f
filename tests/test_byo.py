"""A user's own data: the queries format, an import that nothing overwrites, and a checkpoint trained
elsewhere (a small Llama with plain torch AdamW, saved by `transformers`) indexed end to end."""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import train_like_a_user
from infra.lake import Lake
from demo import import_data, world
from jobs.__main__ import main as jobs_main
from jobs import extract, fit_hessian, register_queries, score, tokenize
from jobs.checkpoints import CheckpointError, load_manifest, load_second_moments
from schemas.queries import QueryFileError, load_queries
from tests.fixtures import running_ranks


def _write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MINIMAL = {
    "query_id": "q1",
    "subject": "Ann Lee",
    "relation": "born_in",
    "object": "Varn",
    "target": "Varn",
    "prompt0": "Ann Lee was born in",
    "stating_doc_ids": ["https://a.example/1"] * 12,
}


def test_queries_file_lists_every_problem_by_line_and_fills_defaults(tmp_path):
    bad = _write_lines(
        tmp_path / "queries.jsonl",
        [
            MINIMAL,
            MINIMAL | {"object": "X"},  # repeats q1
            {k: v for k, v in MINIMAL.items() if k != "subject"} | {"query_id": "q2", "stating_docs": []},
            "[1, 2]",
            "",
            MINIMAL | {"query_id": "q3", "frequency_bucket": "10", "aliases": "Varn City"},
            MINIMAL | {"query_id": "q4", "prompt1": "Ann Lee's birthplace: "},  # prompts disagree on the space
            "{not json",
        ],
    )
    with pytest.raises(QueryFileError) as caught:
        load_queries(bad)
    assert caught.value.problems == [
        f"{bad}:2: query_id 'q1' repeats line 1",
        f"{bad}:3: missing field 'subject'",
        f"{bad}:3: unknown field 'stating_docs' (fields: query_id, subject, relation, object, target, prompt0, "
        "prompt1, prompt2, aliases, stating_doc_ids, frequency_bucket, fact_id, n_stating_docs)",
        f"{bad}:4: expected a JSON object, found list",
        f"{bad}:6: field 'aliases': Input should be a valid list",
        f"{bad}:6: field 'frequency_bucket': Input should be a valid integer",
        f"{bad}:7: some prompts end in whitespace and some do not, but they share one target",
        f"{bad}:8: malformed JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
    ]
    good = load_queries(
        _write_lines(
            tmp_path / "good.jsonl",
            [MINIMAL, MINIMAL | {"query_id": "q2", "prompt0": "Born in ", "target": "Varn", "stating_doc_ids": ["u"]}],
        )
    )
    first, second = good.queries
    assert first["target"] == " Varn" and second["target"] == "Varn"  # space prepended only where the prompt lacks one
    assert first["prompt1"] == first["prompt2"] == first["prompt0"] and first["aliases"] == []
    assert (first["frequency_bucket"], second["frequency_bucket"]) == (10, 1)  # nearest bucket to 12 and 1 documents
    assert good.notes == ["1 target(s) lacked the leading space their prompt needs; a space was prepended (lines 1)"]


# ------------------------------------------------------------------ a checkpoint trained elsewhere
def _tiny_llama(corpus_dir, out_dir, steps=12):
    """A Llama-style model with its own byte-level BPE tokenizer (`</s>` as end of text), trained a few
    steps by a plain torch AdamW loop and saved as a user would: save_pretrained + optimizer.pt."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [
        json.loads(line)["text"] for path in sorted(corpus_dir.glob("c4-*.json.gz")) for line in gzip.open(path, "rt")
    ]
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        texts, vocab_size=400, min_frequency=2, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-7)
    train_like_a_user(model, tokenizer, optimizer, texts, out_dir, steps, block=64, rows=8)
    return model, optimizer


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """A generated corpus and queries rewritten as a user would write them: targets without their
    leading space, optional fields left out, one target the tokenizer cannot encode."""
    root = tmp_path_factory.mktemp("byo")
    world.run(world.WorldConfig(out_dir=str(root / "generated"), world_seed=2, facts_per_bucket=2, n_partitions=2))
    corpus = root / "corpus"
    shutil.copytree(root / "generated" / "raw", corpus)
    rows = []
    for line in (root / "generated" / "world" / "queries.jsonl").read_text().splitlines():
        query = json.loads(line)
        rows.append(
            {k: query[k] for k in ("query_id", "subject", "relation", "object", "prompt0", "stating_doc_ids")}
            | {"target": query["target"].lstrip()}
        )
    rows.append(rows[0] | {"query_id": "unencodable", "target": "</s>"})
    queries = _write_lines(root / "queries.jsonl", rows)
    model, optimizer = _tiny_llama(corpus, root / "llama")
    return root, corpus, queries, model, optimizer


@pytest.fixture(scope="module")
def indexed_llama(user_data):
    root, corpus, queries, model, optimizer = user_data
    lake = root / "lake"
    summary = import_data.import_world(lake, corpus, queries)
    checkpoint = import_data.import_checkpoint(lake, root / "llama")
    register_queries.run(str(lake), str(queries))  # what the pipeline does: problems name the user's own file
    tokenize.run(tokenize.TokenizeConfig(lake=str(lake)))
    extraction = extract.run(
        extract.ExtractConfig(lake=str(lake), checkpoint=str(checkpoint), projection_k=4, token_budget=512)
    )
    fit = fit_hessian.run(
        fit_hessian.FitHessianConfig(
            lake=str(lake), checkpoint_id=extraction["checkpoint_id"], fingerprint=extraction["fingerprint"]
        )
    )
    score.run(
        score.ScoreConfig(
            lake=str(lake),
            checkpoint_id=extraction["checkpoint_id"],
            fingerprint=extraction["fingerprint"],
            methods=["trackstar"],
            top_k=5,
        )
    )
    return Lake(lake), summary, checkpoint, extraction, fit


def test_import_counts_documents_and_normalises_targets(indexed_llama, user_data):
    lake, summary, *_ = indexed_llama
    root, corpus, *_ = user_data
    lines = sum(1 for p in corpus.glob("c4-*.json.gz") for _ in gzip.open(p, "rt"))
    assert summary.documents == lines == lake.read("documents").num_rows and summary.unreadable_lines == 0
    assert summary.words > summary.documents and summary.queries == 11
    assert summary.notes[0].startswith("11 target(s) lacked the leading space")
    stored = lake.read("queries").to_pylist()
    assert len(stored) == 10 and all(q["target"].startswith(" ") for q in stored)
    refused = lake.read("quarantine", filters=[("stage", "=", "register-queries")]).to_pylist()
    assert [r["position"] for r in refused] == [f"{root / 'queries.jsonl'}:11"]
    assert "special/unknown token(s) ['</s>']" in refused[0]["reason"]


def test_adam_state_from_a_torch_optimizer_pt_is_torchs_own(indexed_llama, user_data):
    _, _, checkpoint, _, _ = indexed_llama
    *_, model, optimizer = user_data
    moments = load_second_moments(checkpoint)
    assert moments["kind"] == "adam" and moments["step"] == 12 and moments["betas"] == [0.9, 0.98]
    assert moments["lr"] == 3e-3 and moments["eps"] == 1e-7
    for name, param in model.named_parameters():  # names mapped from torch's numbering, every one exact
        assert torch.equal(moments["state"][name]["exp_avg_sq"], optimizer.state[param]["exp_avg_sq"]), name
    manifest = load_manifest(checkpoint)
    content = hashlib.sha256(
        (checkpoint / "config.json").read_bytes()
        + hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()[:16].encode()
    )
    assert manifest["checkpoint_id"] == f"llama-{content.hexdigest()[:12]}" and manifest["step"] == 12
    assert manifest["optimizer"] == "adam" and manifest["imported_from"] == str(user_data[0] / "llama")


def test_llama_checkpoint_is_indexed_with_the_factored_adam_correction(indexed_llama):
    lake, _, checkpoint, extraction, fit = indexed_llama
    assert extraction["normalizer"] == "adam-half"
    run = lake.read("runs", filters=[("run_id", "=", extraction["run_id"])]).to_pylist()[0]
    config = json.loads(run["config_json"])
    assert config["optimizer_correction"] == (
        "adam-half from the consolidated optimizer state, the default (docs/optimizer-correction.md)"
    )
    assert config["spec"]["normalizer"] == "adam-half" and json.loads(run["counts_json"])["normalizer"] == "adam-half"
    # every Linear of the Llama blocks and the untied head has a block
    assert len(config["spec"]["k"]) == 2 * 7 + 1 and "lm_head.weight" in config["spec"]["k"]
    registered = lake.read("checkpoints").to_pylist()[0]
    assert registered["optimizer"] == "adam" and registered["learning_rate"] == 3e-3 and registered["step"] == 12
    tokens = lake.read("tokens", columns=["chunk", "input_ids", "n_tokens"]).to_pylist()
    assert max(t["n_tokens"] for t in tokens) <= 64  # the Llama's max_position_embeddings
    assert all(t["input_ids"][0] == 1 for t in tokens if t["chunk"] == 0)  # its own end of text, </s>, first
    proponents = lake.read("proponents", filters=[("method", "=", "trackstar")]).to_pylist()
    queries = {q["query_id"] for q in lake.read("queries", columns=["query_id"]).to_pylist()}
    per_query = {q: sorted(p["rank"] for p in proponents if p["query_id"] == q) for q in queries}
    assert all(ranks == [1, 2, 3, 4, 5] for ranks in per_query.values())
    assert fit["checkpoint_id"] == extraction["checkpoint_id"]


def test_the_same_folder_without_optimizer_state_is_indexed_without_correction(indexed_llama, user_data, tmp_path):
    lake, _, _, corrected, _ = indexed_llama
    bare = tmp_path / "llama-bare"
    shutil.copytree(user_data[0] / "llama", bare, ignore=shutil.ignore_patterns("optimizer.pt"))
    assert load_manifest(bare)["optimizer"] == "none" and load_manifest(bare)["lr"] is None
    checkpoint = import_data.import_checkpoint(lake.root, bare)  # same tokenizer: the same lake takes it
    extraction = extract.run(
        extract.ExtractConfig(
            lake=lake.root,
            checkpoint=str(checkpoint),
            projection_k=4,
            token_budget=512,
            query_set=None,
            partitions=[0],
            ranks=1,
        )
    )
    assert extraction["normalizer"] == "none" and extraction["fingerprint"] != corrected["fingerprint"]
    run = lake.read("runs", filters=[("run_id", "=", extraction["run_id"])]).to_pylist()[0]
    assert json.loads(run["config_json"])["optimizer_correction"].startswith(
        "none: the checkpoint has no optimizer state"
    )
    stored = lake.read(
        "train_gradients", filters=[("checkpoint_id", "=", extraction["checkpoint_id"])], columns=["fingerprint"]
    )
    assert stored.num_rows > 0 and set(stored["fingerprint"].to_pylist()) == {extraction["fingerprint"]}
    registered = lake.read("checkpoints", filters=[("checkpoint_id", "=", extraction["checkpoint_id"])]).to_pylist()
    assert registered[0]["optimizer"] == "none" and registered[0]["learning_rate"] is None
    with pytest.raises(CheckpointError, match="needs the optimizer's state"):
        extract.run(extract.ExtractConfig(lake=lake.root, checkpoint=str(checkpoint), normalizer="adam-exact"))
    assert running_ranks() == []  # a plan that fails stops the ranks started meanwhile


def test_a_checkpoint_without_optimizer_state_is_evaluated_with_sgd_tail_patch(indexed_llama, user_data, tmp_path):
    """No optimizer state and no learning rate: the evaluation still runs (no correction, the
    tail-patch steps by plain SGD at the default rate) and its report says so."""
    from evaluation import evaluate

    source, *_ = indexed_llama
    lake = Lake(shutil.copytree(source.root, tmp_path / "lake"))
    bare = tmp_path / "llama-without-state"  # not the other test's folder: its import is in the copied lake
    shutil.copytree(user_data[0] / "llama", bare, ignore=shutil.ignore_patterns("optimizer.pt"))
    checkpoint = import_data.import_checkpoint(lake.root, bare)
    report = evaluate.run(
        evaluate.EvaluateConfig(
            lake=lake.root,
            checkpoint=str(checkpoint),
            seeds=[0],
            variants=[],
            projection_k=4,
            tail_patch_queries=6,
            top_k=5,
            reports=str(tmp_path / "reports"),
        )
    )
    assert report["tail_patch_step"] == "SGD at lr 0.001: the checkpoint has no optimizer state"
    assert report["findings"][-1] == f"The tail-patch step: {report['tail_patch_step']}."
    assert {"bm25", "trackstar", "trackstar-no-optimizer"} <= set(report["methods"])
    patched = [cell["tail_patch"] for cell in report["methods"].values()]
    assert all(np.isfinite(patched)) and any(value != 0 for value in patched)
    fingerprint = report["hessian"]["fingerprint"]
    runs = [json.loads(r["config_json"]) for r in lake.read("runs", filters=[("command", "=", "extract")]).to_pylist()]
    assert any(r["fingerprint"] == fingerprint and r["spec"]["normalizer"] == "none" for r in runs)


def test_another_parameter_order_is_read_by_param_names_or_refused(user_data, tmp_path):
    *_, model, _ = user_data
    shutil.copytree(user_data[0] / "llama", tmp_path / "shuffled")
    model(input_ids=torch.tensor([[1, 5, 6]]), labels=torch.tensor([[1, 5, 6]])).loss.backward()
    named = torch.optim.AdamW(list(model.named_parameters())[::-1])  # torch saves param_names with these
    named.step()
    torch.save(named.state_dict(), tmp_path / "shuffled" / "optimizer.pt")
    moments = load_second_moments(tmp_path / "shuffled")
    for name, param in model.named_parameters():
        assert torch.equal(moments["state"][name]["exp_avg_sq"], named.state[param]["exp_avg_sq"]), name
    unnamed = torch.optim.AdamW(list(model.parameters())[::-1])  # numbers only, in another order
    unnamed.step()
    torch.save(unnamed.state_dict(), tmp_path / "shuffled" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="was not built from model.parameters"):
        load_second_moments(tmp_path / "shuffled")


def test_make_run_refuses_to_wipe_imported_data(indexed_llama, user_data, capsys):
    root = Path(indexed_llama[0].root)
    before = {p: p.read_bytes() for p in sorted((root / "raw").glob("*")) + [root / "world" / "queries.jsonl"]}
    # what `make run` calls: no --corpus, so it would regenerate the world
    assert jobs_main(["pipeline", "--lake", str(root), "--airflow-home", str(root / ".airflow")]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: pipeline: ") and "Traceback" not in message
    assert "holds an imported world" in message and f"--corpus {user_data[1]}" in message
    with pytest.raises(import_data.ImportedDataError):
        world.run(world.WorldConfig(out_dir=str(root)))
    assert {p: p.read_bytes() for p in before} == before and not (root / "world" / "kb.json").exists()


def test_the_readme_example_is_a_valid_queries_file(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("## Your own data", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    loaded = load_queries(_write_lines(tmp_path / "queries.jsonl", example.strip().splitlines()))
    assert [q["target"] for q in loaded.queries] == [" Warsaw", " Poland"]
    assert [q["frequency_bucket"] for q in loaded.queries] == [1, 30]


def test_progress_line_names_a_token_rate_only_when_tokens_are_counted():
    import io

    from jobs.progress import Progress

    pairs, rows = (
        Progress("tail-patch", 4, unit="pairs", stream=io.StringIO()),
        Progress("extract", 2, unit="rows", stream=io.StringIO()),
    )
    pairs.update(4)
    rows.update(2, tokens=100)
    assert "tok/s" not in pairs.stream.getvalue() and "4/4 pairs" in pairs.stream.getvalue()
    assert " tok/s " in rows.stream.getvalue() and " 0 tok/s" not in rows.stream.getvalue()
