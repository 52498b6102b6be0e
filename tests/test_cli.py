"""The command line: `check` passes on the CPU and notices a wrong op; `demo` trains and reports."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from longattn import check, demo
from longattn.__main__ import main


def test_check_passes_on_cpu(capsys):
    assert main(["check", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert table.count("| pass |") == len(check.CASES)


def test_check_fails_on_a_wrong_op(monkeypatch, capsys):
    case = check.CASES[0]
    noisy = dataclasses.replace(case, op=lambda x: case.op(x) * 1.001)
    monkeypatch.setattr(check, "CASES", [noisy])
    assert not check.run(torch.device("cpu"))
    assert "FAIL" in capsys.readouterr().out


# small enough to train in seconds: 64 tokens, 4 pairs in the first half, 8 queries at the end
TINY = {"seq_len": 64, "num_pairs": 4, "num_keys": 8, "d_model": 32, "num_heads": 2}


@pytest.mark.parametrize("family", demo.FAMILIES)
def test_demo_family_trains_and_reports(family):
    # one step of the short-length curriculum (32 tokens), two at 64
    cfg = demo.DemoConfig(
        families=(family,), steps=3, eval_every=1, batch_size=4, eval_size=8, **TINY
    )
    cfg.short_len, cfg.short_share = 32, 1 / 3
    result = demo.train_family(family, cfg)
    assert result.error is None and result.params > 0 and result.tokens_per_s > 0
    assert result.peak_mem_mb >= 0
    assert [s for s, _ in result.curve] == [1, 2, 3]
    assert all(0.0 <= acc <= 1.0 for _, acc in result.curve)
    assert f"| {family} | {result.accuracy:.3f} |" in demo.format_table([result], cfg)


def test_recall_batch_structure():
    cfg = demo.DemoConfig(seq_len=256, num_pairs=8, num_queries=32, num_keys=16)
    n, T = 6, cfg.seq_len
    ids, targets = demo.recall_batch(cfg, n, torch.Generator().manual_seed(0))
    first_query = demo.query_start(T)
    is_key = (ids >= cfg.num_filler) & (ids < cfg.num_filler + cfg.num_keys)
    slot = (T // 2) // cfg.num_pairs
    for b in range(n):
        key_pos = [int(t) for t in is_key[b, : T // 2].nonzero()]
        # one pair per slot of the first half, its value right after the key
        assert [t // slot for t in key_pos] == list(range(cfg.num_pairs))
        lookup = {int(ids[b, t]): int(ids[b, t + 1]) for t in key_pos}
        assert len(lookup) == cfg.num_pairs  # distinct keys
        answered = (targets[b] != demo.IGNORE).nonzero().flatten().tolist()
        assert len(answered) == cfg.num_queries
        for t in answered:
            assert t >= first_query and targets[b, t] == lookup[int(ids[b, t])]
            # the key is far back: more than a quarter of the sequence before the query
            key_at = next(p for p in key_pos if int(ids[b, p]) == int(ids[b, t]))
            assert t - key_at > T // 4
        # nothing else in the sequence is a key: fillers between, no key outside pairs/queries
        assert int(is_key[b].sum()) == cfg.num_pairs + cfg.num_queries
        assert (targets[b, :first_query] == demo.IGNORE).all()


def test_recall_batch_rejects_pairs_that_do_not_fit():
    with pytest.raises(ValueError, match="num_pairs"):
        demo.DemoConfig(seq_len=32, num_pairs=16).validate()


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_sweep_reports_every_family_and_plots(tmp_path):
    cfg = demo.DemoConfig(families=("sdpa", "rat"), sweep_lengths=(32, 64), **TINY)
    cells = demo.sweep(cfg)
    assert set(cells) == {"sdpa", "rat"}
    for row in cells.values():
        assert set(row) == {32, 64}
        assert all(c.failure is None and c.ms > 0 and c.mem_mb > 0 for c in row.values())
    table = demo.format_sweep(cells, cfg)
    assert table.count("| sdpa |") == 2 and table.count("| rat |") == 2
    png = tmp_path / "sweep.png"
    # a PNG where matplotlib is installed (the demo extra), a False answer where it is not
    assert demo.plot_sweep(cells, cfg, str(png)) == _has_matplotlib() == png.exists()


def test_sweep_marks_a_failing_family_and_goes_on(monkeypatch):
    cfg = demo.DemoConfig(families=("sdpa", "rat"), sweep_lengths=(32,), **TINY)
    real = demo.time_step

    def rat_runs_out(family, cfg, seq_len):
        if family == "rat":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(family, cfg, seq_len)

    monkeypatch.setattr(demo, "time_step", rat_runs_out)
    cells = demo.sweep(cfg)
    assert cells["rat"][32].failure == "OOM" and cells["sdpa"][32].failure is None
    assert "| rat | OOM |" in demo.format_sweep(cells, cfg)


def test_cli_parses_and_runs_a_short_demo(tmp_path, capsys):
    png = tmp_path / "recall.png"
    argv = ["demo", "--device", "cpu", "--families", "sdpa,rat", "--seq-len", "64"]
    argv += ["--pairs", "4", "--queries", "8", "--steps", "2", "--batch-size", "2"]
    argv += ["--chunk-size", "2", "--png", str(png), "--sweep-png", ""]
    argv += ["--sweep-lengths", "32", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 key-value pairs in the first half of 64 tokens" in out
    assert "| ms per step | 32 | 64 |" in out
    assert "| rat |" in out and png.exists() == _has_matplotlib()


def test_cli_defaults_scale_with_the_device():
    cpu, gpu = demo.DemoConfig.for_device("cpu"), demo.DemoConfig.for_device("cuda")
    assert cpu.seq_len == 512 and max(cpu.sweep_lengths) == 8192
    assert gpu.seq_len == 4096 and max(gpu.sweep_lengths) == 65536
    assert gpu.num_pairs > cpu.num_pairs
    assert demo.DemoConfig.for_device("cuda", seq_len=16384).seq_len == 16384
