"""The command line: `check` passes on the CPU and notices a wrong op; `demo` trains and reports."""

from __future__ import annotations

import dataclasses

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


@pytest.mark.parametrize("family", demo.FAMILIES)
def test_demo_family_trains_and_reports(family):
    cfg = demo.DemoConfig(families=(family,), steps=3, eval_every=1, batch_size=8, eval_size=16)
    result = demo.train_family(family, cfg)
    assert result.error is None and result.params > 0 and result.tokens_per_s > 0
    assert [s for s, _ in result.curve] == [1, 2, 3]
    assert all(0.0 <= acc <= 1.0 for _, acc in result.curve)
    assert family in demo.format_table([result], cfg)


def test_mqar_targets_are_the_values_of_the_queried_keys():
    cfg = demo.DemoConfig()
    ids, targets = demo.mqar_batch(cfg, 4, torch.Generator().manual_seed(0))
    pairs = ids[:, : 2 * cfg.num_pairs].view(4, cfg.num_pairs, 2)
    for b in range(4):
        lookup = {int(k): int(v) for k, v in pairs[b]}
        for t in range(2 * cfg.num_pairs, cfg.seq_len):
            assert targets[b, t] == lookup[int(ids[b, t])]
        assert (targets[b, : 2 * cfg.num_pairs] == demo.IGNORE).all()
