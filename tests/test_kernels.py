"""gradient_kernels against exact references: full per-example gradients, closed forms, torch's own optimizers."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradient_kernels.attribution import token_contributions
from gradient_kernels.hessian import (
    Autocorrelation,
    conditioning,
    crossing_component,
    crossing_lambda,
    damped_inverse_power,
    mix,
    spectrum,
    train_relative_damping,
)
from gradient_kernels.hooks import GradientProjector
from gradient_kernels.losses import document_batch, per_example_loss, query_batch
from gradient_kernels.modules import uniform_k, weight_matrices
from gradient_kernels.normalizers import (
    MissingOptimizerState,
    adam_denominator,
    floored_denominator,
    normalizers_from_state,
    rank1_error,
)
from gradient_kernels.projection import ProjectionSpec, gaussian_projection
from gradient_kernels.reference import dense_projection, reference_vectors
from gradient_kernels.scoring import FingerprintMismatch, Preconditioner, check_same, merge_top_k, prepare, top_k
from gradient_kernels.tail_patch import STACKED_PARAMETER_BYTES, AdafactorStep, AdamStep, TailPatcher, optimizer_step

VOCAB = 61


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB, n_positions=24, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
        )
    )


def _llama():  # nn.Linear everywhere, untied output head
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=24,
            tie_word_embeddings=False,
        )
    )


def _documents(seed=1, n=5):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def _train_state(model, kind: str, steps=3) -> dict:
    """A few real optimizer steps, saved in the consolidated optimizer.pt layout."""
    if kind == "adam":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)
    else:
        optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = document_batch(_documents(seed=100 + step, n=4))
        optimizer.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).logits
        per_example_loss(logits, batch).sum().backward()
        optimizer.step()
    group = optimizer.param_groups[0]
    state = {}
    for name, p in model.named_parameters():
        held = optimizer.state[p]
        keys = ("exp_avg_sq",) if kind == "adam" else (("row_var", "col_var") if "row_var" in held else ("variance",))
        state[name] = {key: held[key].clone() for key in keys}
    return {
        "kind": kind,
        "step": steps,
        "lr": group["lr"],
        "betas": list(group.get("betas", ())),
        "eps": group["eps"],
        "state": state,
    }


CASES = [
    ("gpt2", "adafactor"),
    ("gpt2", "adam-exact"),
    ("gpt2", "adam-floored"),
    ("gpt2", "adam-factored"),
    ("gpt2", "adam-half"),
    ("gpt2", "adam-flat-vocab"),
    ("gpt2", "none"),
    ("llama", "adam-exact"),
    ("llama", "adafactor"),
    ("llama", "adam-flat-vocab"),
]


def _setup(arch, normalizer, k=4, seed=7):
    model = _gpt2() if arch == "gpt2" else _llama()
    state = _train_state(model, "adafactor" if normalizer == "adafactor" else "adam")
    matrices = weight_matrices(model)
    spec = ProjectionSpec(seed=seed, k=uniform_k(matrices, k), normalizer=normalizer)
    normalizers = normalizers_from_state(state, matrices, normalizer)
    return model, spec, normalizers


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch,normalizer", CASES)
def test_hook_path_equals_full_per_example_gradients(arch, normalizer):
    model, spec, normalizers = _setup(arch, normalizer)
    projector = GradientProjector(model, spec, normalizers)
    batch = document_batch(_documents())
    fast = projector(batch)
    exact = reference_vectors(model, batch, spec, normalizers)
    assert fast.shape == (5, spec.dim)
    assert _rel_err(fast, exact) < 1e-4
    for row in range(5):
        assert _rel_err(fast[row], exact[row]) < 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_path_in_chunks_of_examples_equals_the_reference(arch, monkeypatch):
    """The exact correction forms full per-example gradients a few examples at a time; one byte
    per chunk forces one example per chunk, and the vectors stay those of the reference."""
    import gradient_kernels.hooks as hooks

    model, spec, normalizers = _setup(arch, "adam-exact")
    batch = document_batch(_documents())
    whole = GradientProjector(model, spec, normalizers)(batch)
    monkeypatch.setitem(hooks.EXACT_CHUNK_BYTES, "cpu", 1)
    projector = GradientProjector(model, spec, normalizers)
    assert all(projector._exact_rows(name) == 1 for name in projector.exact)
    chunked = projector(batch)
    assert _rel_err(chunked, reference_vectors(model, batch, spec, normalizers)) < 1e-4
    assert _rel_err(chunked, whole) < 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_several_specs_in_one_pass_equal_each_alone(arch):
    """Other seeds, sizes and normalisers share one backward pass (and, with the same state, one
    division per chunk); each spec's vectors are those of its own projector."""
    model, spec, exact = _setup(arch, "adam-exact")
    state = _train_state(model, "adam")
    matrices = weight_matrices(model)
    factored = normalizers_from_state(state, matrices, "adam-factored")
    more = [
        (ProjectionSpec(seed=8, k=uniform_k(matrices, 4), normalizer="adam-exact"), exact),
        (ProjectionSpec(seed=7, k=uniform_k(matrices, 3), normalizer="none"), {}),
        (ProjectionSpec(seed=9, k=uniform_k(matrices, 4), normalizer="adam-factored"), factored),
    ]
    batch = document_batch(_documents())
    together = GradientProjector(model, spec, exact, more=more).project(batch)
    for (one, normalizers), vectors in zip([(spec, exact)] + more, together):
        alone = GradientProjector(model, one, normalizers)(batch)
        assert vectors.shape == alone.shape == (5, one.dim)
        assert _rel_err(vectors, alone) < 1e-6
    assert _rel_err(together[1], reference_vectors(model, batch, more[0][0], exact)) < 1e-4


def test_covers_every_matrix_kind_and_ties_the_head_once():
    gpt2_names = [m.name for m in weight_matrices(_gpt2())]
    assert gpt2_names[-1] == "transformer.wte.weight"  # the tied head: one block under its one parameter
    assert len(gpt2_names) == 2 * 4 + 1 and len(set(gpt2_names)) == len(gpt2_names)
    llama = weight_matrices(_llama())
    assert llama[-1].name == "lm_head.weight" and llama[-1].tied_embedding is None
    assert not any(m.stored_transposed for m in llama)
    assert all(m.stored_transposed for m in weight_matrices(_gpt2())[:-1])


def test_query_loss_counts_only_target_tokens():
    model, spec, normalizers = _setup("gpt2", "adam-exact")
    projector = GradientProjector(model, spec, normalizers)
    prompts, targets = [[5, 6, 7, 8], [9, 10]], [[11, 12], [13]]
    batch = query_batch(prompts, targets)
    assert batch.target_mask.tolist() == [[False] * 4 + [True] * 2, [False, False, True, False, False, False]]
    fast = projector(batch)
    assert _rel_err(fast, reference_vectors(model, batch, spec, normalizers)) < 1e-4
    other_target = projector(query_batch(prompts, [[40, 12], [13]]))
    assert not torch.allclose(fast[0], other_target[0]) and torch.allclose(fast[1], other_target[1], atol=1e-6)


def test_batch_composition_order_and_padding_do_not_change_a_vector():
    model, spec, normalizers = _setup("gpt2", "adafactor")
    projector = GradientProjector(model, spec, normalizers)
    docs = _documents(n=6)
    together = projector(document_batch(docs))
    reversed_ = projector(document_batch(docs[::-1])).flip(0)
    alone = torch.cat([projector(document_batch([d])) for d in docs])
    padded = projector(document_batch(docs + [[1] * 23]))[:6]  # a long neighbour pads everyone more
    scale = together.abs().max()
    for other in (reversed_, alone, padded):
        assert (together - other).abs().max() <= 1e-5 * scale


def test_projection_is_a_pure_function_across_processes():
    a = gaussian_projection(3, "layer.weight", "out", 8, 50)
    code = (
        "import torch,sys; from gradient_kernels.projection import gaussian_projection as g; "
        "sys.stdout.write(g(3,'layer.weight','out',8,50).numpy().tobytes().hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert a.numpy().tobytes().hex() == other
    assert abs(float(a.var()) - 1 / 8) < 0.03  # N(0, 1/k)
    for different in (
        gaussian_projection(4, "layer.weight", "out", 8, 50),
        gaussian_projection(3, "layer.bias", "out", 8, 50),
        gaussian_projection(3, "layer.weight", "in", 8, 50),
    ):
        assert not torch.equal(a, different)


def test_fingerprint_names_everything_that_changes_vectors():
    base = ProjectionSpec(seed=1, k={"a": 4, "b": 4}, normalizer="adafactor")
    assert base.fingerprint() == ProjectionSpec(seed=1, k={"a": 4, "b": 4}, normalizer="adafactor").fingerprint()
    variants = [
        ProjectionSpec(seed=2, k={"a": 4, "b": 4}),
        ProjectionSpec(seed=1, k={"a": 4, "b": 8}),
        ProjectionSpec(seed=1, k={"a": 4}),
        ProjectionSpec(seed=1, k={"a": 4, "b": 4}, normalizer="none"),
        ProjectionSpec(seed=1, k={"a": 4, "b": 4}, dtype="bfloat16"),
    ]
    assert len({v.fingerprint() for v in variants} | {base.fingerprint()}) == 6
    with pytest.raises(FingerprintMismatch):
        check_same("projection fingerprint", base.fingerprint(), variants[0].fingerprint())


def test_dense_projection_is_the_kronecker_product():
    u = torch.randn(1, 6, 5)
    spec = ProjectionSpec(seed=0, k={"w": 3}, normalizer="none")
    p_out, p_in = gaussian_projection(0, "w", "out", 3, 6), gaussian_projection(0, "w", "in", 3, 5)
    expected = torch.kron(p_out, p_in) @ u[0].reshape(-1)
    assert torch.allclose(dense_projection({"w": u}, spec)[0], expected, atol=1e-6)


def test_adam_denominator_is_what_torch_adam_divides_by():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.1, betas=(0.9, 0.95), eps=1e-3, weight_decay=0)
    for _ in range(3):
        opt.zero_grad()
        (w**3).sum().backward()
        opt.step()
    before = w.detach().clone()
    opt.zero_grad()
    (w**3).sum().backward()
    opt.step()
    state = opt.state[w]
    denominator = adam_denominator(state["exp_avg_sq"], 4, 0.95, 1e-3, transposed=False)
    expected_step = -0.1 * (state["exp_avg"] / (1 - 0.9**4)) / denominator
    assert torch.allclose(w.detach() - before, expected_step.float(), atol=1e-6)


def test_adafactor_correction_matches_torch_variance_estimate():
    model = _gpt2()
    state = _train_state(model, "adafactor")
    matrices = weight_matrices(model)
    normalizers = normalizers_from_state(state, matrices, "adafactor")
    m = matrices[0]  # a Conv1D: stored (in, out)
    held = state["state"][m.name]
    v = held["row_var"] @ held["col_var"] / held["row_var"].mean(dim=-2, keepdim=True)
    expected = v.clamp(min=torch.finfo(torch.float32).eps ** 2).rsqrt().t()  # torch's factor, (out, in)
    g = torch.randn(m.out_features, m.in_features)
    assert torch.allclose(normalizers[m.name].divide(g), g * expected, rtol=1e-4)


def test_rank1_fit_error_is_zero_for_rank1_and_measured_otherwise():
    r, c = torch.rand(5) + 0.1, torch.rand(4) + 0.1
    exact_rank1 = (r[:, None] * c[None, :]).sqrt().double()
    assert rank1_error(exact_rank1, 0.0) < 1e-6
    assert rank1_error(torch.rand(5, 4).double() + 0.01, 0.0) > 1e-3


def test_half_correction_weighs_a_dot_product_by_one_over_sqrt_v():
    """adam-half on both sides of a dot product weighs each coordinate by the rank-1 fit's
    1/sqrt(V̂) once (the first-order effect of one Adam step), where adam-factored weighs by 1/V̂."""
    model = _gpt2()
    state = _train_state(model, "adam")
    matrices = weight_matrices(model)
    full = normalizers_from_state(state, matrices, "adam-factored")
    half = normalizers_from_state(state, matrices, "adam-half")
    for m in matrices:
        g_query, g_train = torch.randn(2, *full[m.name].out_scale.shape, *full[m.name].in_scale.shape).double()
        one_adam_step = (full[m.name].divide(g_query.float()).double() * g_train).sum()
        halves = (half[m.name].divide(g_query.float()) * half[m.name].divide(g_train.float())).double().sum()
        assert abs(halves - one_adam_step) <= 1e-4 * abs(one_adam_step) + 1e-6
        both_sides = (full[m.name].divide(g_query.float()) * full[m.name].divide(g_train.float())).double().sum()
        assert abs(both_sides - one_adam_step) > 1e-2 * abs(one_adam_step)  # the full correction squares it


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_flat_vocab_correction_leaves_only_the_heads_token_rows_flat(arch):
    """adam-flat-vocab is the rank-1 fit everywhere but on the output head's vocabulary side (tied to
    the embedding in GPT-2, its own lm_head in Llama), whose row scales are all alike there."""
    model = _gpt2() if arch == "gpt2" else _llama()
    state = _train_state(model, "adam")
    matrices = weight_matrices(model)
    fit = normalizers_from_state(state, matrices, "adam-factored")
    flat = normalizers_from_state(state, matrices, "adam-flat-vocab")
    heads = [m for m in matrices if m.output_head]
    assert len(heads) == 1 and heads[0].out_features == model.config.vocab_size
    for m in matrices:
        assert torch.equal(flat[m.name].in_scale, fit[m.name].in_scale)
        if m.output_head:
            assert fit[m.name].out_scale.std() > 0.1 * fit[m.name].out_scale.mean()  # the fit does vary by token
            assert torch.allclose(flat[m.name].out_scale, fit[m.name].out_scale.mean().expand(m.out_features))
        else:
            assert torch.equal(flat[m.name].out_scale, fit[m.name].out_scale)
    with pytest.raises(ValueError, match="output head"):
        normalizers_from_state(state, [m for m in matrices if not m.output_head], "adam-flat-vocab")


def test_missing_or_wrong_optimizer_state_is_a_clear_error():
    model = _gpt2()
    state = _train_state(model, "adam", steps=1)
    matrices = weight_matrices(model)
    del state["state"][matrices[2].name]
    with pytest.raises(MissingOptimizerState, match=matrices[2].name):
        normalizers_from_state(state, matrices, "adam-exact")
    with pytest.raises(ValueError, match="needs a adafactor optimizer state"):
        normalizers_from_state(state, matrices, "adafactor")


def test_switches_change_the_computation():
    model, spec, normalizers = _setup("gpt2", "adafactor")
    docs = document_batch(_documents())
    corrected = GradientProjector(model, spec, normalizers)(docs)
    plain = GradientProjector(model, ProjectionSpec(seed=7, k=spec.k, normalizer="none"))(docs)
    assert _rel_err(corrected / corrected.norm(), plain / plain.norm()) > 0.1
    r = Autocorrelation(spec.block_sizes()).add(corrected)
    root, _ = damped_inverse_power(r.mean())
    with_r, without_r = prepare(corrected, Preconditioner(root)), prepare(corrected)
    assert _rel_err(with_r, without_r) > 0.1
    assert torch.allclose(prepare(corrected).norm(dim=1), torch.ones(5))
    assert not torch.allclose(prepare(corrected, unit_norm=False).norm(dim=1), torch.ones(5))


def test_autocorrelation_streams_and_merges():
    x = torch.randn(10, 6, dtype=torch.float64)
    whole = Autocorrelation.dense(6).add(x)
    parts = Autocorrelation.dense(6).add(x[:4]).merge(Autocorrelation.dense(6).add(x[4:]))
    assert parts.count == 10 and torch.allclose(parts.mean()[0], x.T @ x / 10)
    assert torch.allclose(whole.mean()[0], parts.mean()[0])
    blocks = Autocorrelation([2, 4]).add(x).mean()
    assert torch.allclose(blocks[0], (x.T @ x / 10)[:2, :2]) and torch.allclose(blocks[1], (x.T @ x / 10)[2:, 2:])
    with pytest.raises(ValueError):
        Autocorrelation([2, 3]).add(x)


def test_lambda_mixing_and_inverse_root_closed_forms():
    q, t = torch.tensor([4.0, 2.0, 1.0]), torch.tensor([2.0, 2.0, 2.0])
    assert crossing_lambda(q, t, component=2) == pytest.approx(0.5)  # λ·2 = (1-λ)·2
    assert crossing_lambda(q, t, component=3) == pytest.approx(2 / 3)  # λ·1 = (1-λ)·2
    assert crossing_lambda(q, t, component=1000) == pytest.approx(2 / 3)  # clamped to the last component
    assert crossing_lambda(torch.zeros(3), t, component=1) == 0.0
    # past the rank of R_query (two query vectors) the rule uses the last nonzero component
    assert crossing_lambda(torch.tensor([4.0, 1.0, 0.0]), t, component=1000) == pytest.approx(2 / 3)
    rq, rt = [torch.eye(2) * 4], [torch.eye(2)]
    assert torch.allclose(mix(rq, rt, 0.25)[0], torch.eye(2) * 1.75)
    with pytest.raises(ValueError):
        mix(rq, rt, 1.5)
    root, damping = damped_inverse_power([torch.diag(torch.tensor([1.0, 4.0]))], damping=1e-12)
    assert torch.allclose(root[0], torch.diag(torch.tensor([1.0, 0.5])), atol=1e-5)
    a = torch.randn(6, 6, dtype=torch.float64)
    r = a @ a.T
    root, (damping,) = damped_inverse_power([r])
    assert damping == pytest.approx(0.1 * float(torch.linalg.eigvalsh(r).mean()))
    damped = r + damping * torch.eye(6, dtype=torch.float64)
    assert torch.allclose(root[0].double() @ root[0].double() @ damped, torch.eye(6, dtype=torch.float64), atol=1e-4)
    inverse, _ = damped_inverse_power([r], power=-1.0)
    assert torch.allclose(inverse[0].double() @ damped, torch.eye(6, dtype=torch.float64), atol=1e-4)
    assert torch.equal(
        spectrum([torch.diag(torch.tensor([1.0, 3.0])), torch.tensor([[2.0]])]),
        torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64),
    )


def test_top_k_is_exact_and_merges():
    torch.manual_seed(0)
    queries, train = torch.randn(3, 8), torch.randn(50, 8)
    values, indices = top_k(queries, train, 5)
    brute = (queries @ train.T).sort(dim=1, descending=True)
    assert torch.equal(indices, brute.indices[:, :5]) and torch.allclose(values, brute.values[:, :5])
    a = top_k(queries, train[:20], 5)
    b = top_k(queries, train[20:], 5, index_offset=20)
    merged = merge_top_k(*a, *b, k=5)
    assert torch.equal(merged[1], indices) and torch.allclose(merged[0], values)


def test_token_contributions_sum_to_the_score():
    model, spec, normalizers = _setup("gpt2", "adafactor")
    projector = GradientProjector(model, spec, normalizers)
    docs = _documents(n=6)
    train = projector(document_batch(docs))
    query_raw = projector(query_batch([[3, 4, 5]], [[6, 7]]))
    root, _ = damped_inverse_power(Autocorrelation(spec.block_sizes()).add(train).mean())
    preconditioner = Preconditioner(root)
    query = prepare(query_raw, preconditioner)[0]
    score = float(prepare(train[:1], preconditioner)[0] @ query)
    contributions = token_contributions(projector, docs[0], query, preconditioner, batch_size=4)
    assert contributions.shape == (len(docs[0]),) and contributions[0] == 0
    assert float(contributions.sum()) == pytest.approx(score, rel=1e-4, abs=1e-6)
    assert contributions.abs().max() > 0


def test_the_preconditioner_applies_each_block_and_stacks_equal_blocks_once_per_dtype(monkeypatch):
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(6, 6, generator=g) for _ in range(3)]
    vectors = torch.randn(5, 18, generator=g)
    expected = torch.cat([vectors[:, 6 * i : 6 * i + 6] @ block for i, block in enumerate(blocks)], dim=1)
    stacks = []
    original_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacks.append(1) or original_stack(*a, **k))
    preconditioner = Preconditioner(blocks)
    for _ in range(3):  # the score job's batches
        torch.testing.assert_close(preconditioner.apply(vectors), expected)
    assert len(stacks) == 1
    in_float64 = preconditioner.apply(vectors.double())  # another dtype: its own stack, not the float32 one
    assert in_float64.dtype == torch.float64 and len(stacks) == 2
    torch.testing.assert_close(in_float64, expected.double(), rtol=1e-5, atol=1e-5)
    unequal = Preconditioner([blocks[0], torch.randn(12, 12, generator=g)])
    torch.testing.assert_close(
        unequal.apply(vectors), torch.cat([vectors[:, :6] @ blocks[0], vectors[:, 6:] @ unequal.blocks[1]], dim=1)
    )


def test_documents_too_short_for_a_loss_are_refused():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        document_batch([[1, 2], [3]])


def test_tail_patch_step_is_one_adam_step_from_the_checkpoint_state_and_restores():
    model = _gpt2()
    state = _train_state(model, "adam")
    patcher = TailPatcher(model, AdamStep(state), lr=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    doc, prompt, target = [3, 9, 4, 8, 1], [3, 9], [4, 8]
    base, changes = patcher.log_prob_changes({"d": doc}, [("q", "d")], {"q": prompt}, {"q": target})
    # the same step by torch's own AdamW, resumed from the checkpoint's v with m = 0
    other = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(other.parameters(), lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)
    for name, p in other.named_parameters():
        optimizer.state[p] = {
            "step": torch.tensor(float(state["step"])),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": state["state"][name]["exp_avg_sq"].clone(),
        }
    ids = torch.tensor([doc])
    other(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    batch = query_batch([prompt], [target])
    with torch.no_grad():
        after = -per_example_loss(other(input_ids=batch.input_ids).logits, batch)[0]
    assert changes[("q", "d")] == pytest.approx(float(after) - base["q"], rel=1e-4, abs=1e-6)
    assert abs(changes[("q", "d")]) > 1e-6
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model itself never moves


def test_damping_is_per_block_and_relative_to_r_train_and_the_crossing_is_a_share_of_d():
    # two blocks 10^6 apart in scale, and a query R 10^6 above the train R: the classic global
    # damping of the mixed R swamps every train eigenvalue, the per-block train damping does not
    small, big = torch.diag(torch.tensor([1.0, 2.0, 3.0])), torch.diag(torch.tensor([1e6, 2e6, 3e6]))
    r_train, r_query = [small, big], [small * 1e6, big * 1e6]
    assert train_relative_damping(r_train, 0.1) == pytest.approx([0.2, 2e5])
    mixed = mix(r_query, r_train, 0.5)
    _, (global_d, _) = damped_inverse_power(mixed)
    diagnostics = conditioning(r_train, r_query, mixed, [global_d, global_d])
    assert diagnostics["blocks_damped_above_train_top"] == [0, 1]
    assert diagnostics["query_to_train_trace"] == pytest.approx(1e6)
    dampings = train_relative_damping(r_train, 0.1)
    root, used = damped_inverse_power(mixed, dampings)
    assert used == pytest.approx(dampings)
    for block, d, out in zip(mixed, dampings, root):
        expected = torch.diag((torch.diagonal(block).double() + d) ** -0.5).float()
        assert torch.allclose(out, expected, rtol=1e-5)
    assert conditioning(r_train, r_query, mixed, dampings)["blocks_damped_above_train_top"] == []
    zero_block = train_relative_damping([small, torch.zeros(2, 2)], 0.1)
    assert zero_block[1] == pytest.approx(0.1 * 6 / 5)  # a silent block borrows the overall mean
    assert crossing_component(4352) == 65 and crossing_component(65536) == 983 and crossing_component(10) == 1
    with pytest.raises(ValueError):
        crossing_component(100, 0.0)


def test_floored_adam_correction_does_not_boost_untrained_rows():
    model = _gpt2()
    state = _train_state(model, "adam")
    matrices = weight_matrices(model)
    embedding = next(m for m in matrices if "wte" in m.name)
    held = state["state"][embedding.name]["exp_avg_sq"]
    held[:10] = 0.0  # ten tokens the optimizer never saw
    exact = normalizers_from_state(state, matrices, "adam-exact")[embedding.name].denominator
    floored = normalizers_from_state(state, matrices, "adam-floored")[embedding.name].denominator
    eps = state["eps"]
    untrained = (exact[:, :10] if embedding.stored_transposed else exact[:10]).reshape(-1)
    assert float(untrained.max()) == pytest.approx(eps, rel=1e-3)  # the exact correction divides them by eps
    trained = exact[exact > 2 * eps]
    floor = float(trained.double().kthvalue(max(1, int(0.01 * trained.numel()))).values)
    assert float(floored.min()) == pytest.approx(floor, rel=1e-6)
    assert torch.equal(floored[exact >= floor], exact[exact >= floor])  # trained coordinates untouched
    assert float((exact < floor).float().mean()) < 0.5
    no_trained = torch.full((3, 3), eps, dtype=torch.float64)
    assert torch.equal(floored_denominator(no_trained, eps), no_trained)


def test_adafactor_tail_patch_step_equals_torch_adafactor():
    model = _gpt2()
    state = _train_state(model, "adafactor")
    rule = AdafactorStep(state)
    doc = [3, 9, 4, 8, 1, 7]
    other = copy.deepcopy(model)
    optimizer = torch.optim.Adafactor(other.parameters(), lr=0.05)
    for name, p in other.named_parameters():
        optimizer.state[p] = {"step": torch.tensor(float(state["step"]))} | {
            key: value.clone() for key, value in state["state"][name].items()
        }
    ids = torch.tensor([doc])
    other(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in other.named_parameters()}
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    optimizer.step()
    moved = 0
    for name, p in other.named_parameters():
        expected = p.detach() - before[name]
        ours = rule.delta(name, before[name], grads[name], 0.05)
        assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-7), name
        moved += int(expected.abs().max() > 0)
    assert moved > 5


def test_tail_patch_groups_keep_the_stacked_largest_parameter_under_the_allocators_heap_blocks():
    small = TailPatcher(_gpt2(), optimizer_step(None), lr=0.05)
    assert small.group == 32  # a tiny model: 32 copies of its largest parameter are small
    wide = GPT2LMHeadModel(GPT2Config(vocab_size=16384, n_positions=32, n_embd=64, n_layer=1, n_head=2))
    embedding_bytes = 16384 * 64 * 4  # the largest parameter (tied with the output layer)
    assert TailPatcher(wide, optimizer_step(None), lr=0.05).group == STACKED_PARAMETER_BYTES // embedding_bytes == 5
    assert TailPatcher(wide, optimizer_step(None), lr=0.05, memory_budget_bytes=32 << 20).group == 1  # budget first


@pytest.mark.parametrize("kind", ["adam", "adafactor", "sgd"])
def test_grouped_tail_patch_equals_one_document_at_a_time(kind):
    model = _gpt2()
    model.config.pad_token_id = 0  # as a trained model's config has: transformers then peeks for padding
    state = _train_state(model, "adam" if kind == "sgd" else kind)
    rule = {"adam": AdamStep, "adafactor": AdafactorStep, "sgd": lambda _: optimizer_step(None)}[kind](state)
    documents = dict(enumerate(_documents(seed=5, n=5)))  # different lengths: padding inside a group
    prompts, targets = {"a": [3, 9], "bb": [7, 2, 11], "ccc": [6]}, {"a": [4, 8], "bb": [5], "ccc": [9, 1, 2]}
    # documents with 0, 1 or 2 queries: groups mix counts (a document's queries run as one padded batch)
    pairs = [(q, d) for d in documents for q in ("a", "bb", "ccc") if (d + len(q)) % 4]
    assert [sum(1 for _, d in pairs if d == doc) for doc in documents] == [3, 2, 2, 2, 3]
    patcher = TailPatcher(model, rule, lr=0.05)
    patcher.group = 2
    base, changes = patcher.log_prob_changes(documents, pairs, prompts, targets)
    for query, doc in pairs:  # the plain way: step a copy of the model on the document, ask the query
        other = copy.deepcopy(model)
        ids = torch.tensor([documents[doc]])
        grads = torch.autograd.grad(other(input_ids=ids, labels=ids).loss, list(other.parameters()))
        with torch.no_grad():
            for (name, param), g in zip(other.named_parameters(), grads):
                param += rule.delta(name, param.detach().clone(), g, 0.05)
        batch = query_batch([prompts[query]], [targets[query]])
        with torch.no_grad():
            after = -per_example_loss(other(input_ids=batch.input_ids).logits, batch)[0]
        assert changes[(query, doc)] == pytest.approx(float(after) - base[query], rel=1e-4, abs=1e-6)


def test_the_outlier_threshold_leaves_a_log_normal_corpus_alone_and_takes_junk_out():
    from gradient_kernels.robust import outlier_threshold

    rng = np.random.default_rng(0)
    corpus = np.exp(rng.normal(10.0, 0.5, 100_000))
    threshold = outlier_threshold(corpus)
    assert (corpus > threshold).mean() < 1e-3  # z = 4: ~3e-5 of a log-normal corpus
    junk = np.median(corpus) * np.array([50.0, 1e3, 1e4])
    assert (junk > outlier_threshold(np.concatenate([corpus, np.repeat(junk, 1000)]))).all()  # 3% junk: still out
    assert outlier_threshold(np.full(10, 7.0)) == pytest.approx(28.0)  # no spread: the 4x floor
    assert outlier_threshold(np.array([])) == float("inf")
