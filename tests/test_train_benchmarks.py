"""The GPU training benchmarks' CPU smoke modes, end to end (benchmarks/train_efficiency.py, train_speed.py):
every run trains, the report writes its PNG / JSON / table with finite numbers, and the baselines of the
efficiency experiment match their definitions (at the smoke size and at the real size, planned on `meta`)."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import train_efficiency  # noqa: E402
import train_speed  # noqa: E402

pytest.importorskip("matplotlib")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_baselines(runs: dict) -> None:
    """(b) has (a)'s active non-embedding parameters, (c) meets the definition it reports, both within 10%."""
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert b["active_non_embedding"] == pytest.approx(a["active_non_embedding"], rel=0.10)
    key = {"same_total_params": "total_params", "same_flops": "flops_per_token"}[c["c_rule"]]
    assert c[key] == pytest.approx(a[key], rel=0.10), (c["c_rule"], c[key], a[key])
    assert b["fields"]["model_type"] == c["fields"]["model_type"] == "qwen3"


def test_train_efficiency_smoke(tmp_path):
    out = tmp_path / "runs"
    merged = train_efficiency.main(["--smoke", "--out", str(out)])
    assert (out / "training_efficiency.png").stat().st_size > 10_000
    assert json.loads((out / "train_efficiency.json").read_text())["table"] == merged["table"]
    runs = {r["letter"]: r for r in merged["runs"]}
    assert sorted(runs) == ["a", "b", "c", "d", "e"]
    for r in runs.values():
        assert r["error"] is None, r.get("traceback")
        assert len(r["evals"]) >= 3 and all(finite(p["eval_loss"]) and finite(p["flops"]) for p in r["evals"])
        assert r["evals"][-1]["step"] == r["steps"] and r["evals"][-1]["flops"] > 0
        assert all(finite(r[k]) and r[k] > 0 for k in ("train_s", "tokens_per_s", "flops_per_token", "total_params"))
        assert r["final_eval_loss"] < r["evals"][0]["eval_loss"]          # it learned something
        assert r["flops_per_token"] == pytest.approx(r["trainer_flops_per_token"])   # planned = what trained
    check_baselines(runs)
    assert runs["d"]["fields"]["layer_types"] == ["full_attention"] * runs["a"]["fields"]["num_hidden_layers"]
    assert runs["e"]["fields"]["attn_output_gate"] is False
    assert "| (a) hybrid-moe |" in merged["table"]


def test_train_efficiency_real_plan():
    """The GPU sizes, planned on `meta` (no training): (c) falls back to the same total parameters there."""
    runs = train_efficiency.plan(train_efficiency.FULL_SCALE)
    check_baselines(runs)
    assert runs["c"]["c_rule"] == "same_total_params" and runs["c"]["name"] == "dense-same-total"


def test_train_efficiency_failure_is_recorded(tmp_path):
    """One failing run writes its error and the others go on (here: a model that cannot be built)."""
    scale = train_efficiency.SMOKE_SCALE
    spec = dict(train_efficiency.plan(scale)["a"])
    spec["fields"] = {**spec["fields"], "num_experts_per_tok": 99}      # > num_experts: ModelConfig refuses it
    data = train_efficiency.smoke_data(str(tmp_path / "data"))
    r = train_efficiency.run_variant(spec, scale, data, 2, 0, "cpu", str(tmp_path))
    assert r["error"] and "num_experts_per_tok" in r["error"]
    assert json.loads((tmp_path / "a-hybrid-moe.json").read_text())["error"] == r["error"]


def test_train_speed_smoke(tmp_path):
    out = tmp_path / "speed.json"
    res = train_speed.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["table"] == res["table"]
    for side in ("ours", "transformers"):
        r = saved[side]
        assert r["error"] is None, r.get("traceback")
        assert r["batch"] == 2 and len(r["step_s"]) == 2
        assert finite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and r["top_ops"]
    assert saved["transformers"]["gated_delta_rule"] and saved["transformers"]["master_weights"] == "torch.float32"
    assert saved["total_params"] > saved["active_params"] > 0 and finite(saved["flops_per_token"])


def test_train_speed_halves_the_batch_on_oom():
    """A side that runs out of memory is retried with half the batch; any other failure is recorded."""
    import torch
    built = []

    def build(batch):
        built.append(batch)
        if batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return (lambda: None), {"implementation": "fake"}, None

    setup = {"seq_len": 8, "warmup": 0, "steps": 2}
    r = train_speed.measure("fake", build, 4, setup, 1.0, torch.device("cpu"))
    assert built == [4, 2, 1] and r["oom_at_batch"] == [4, 2] and r["batch"] == 1 and r["error"] is None

    def broken(batch):
        raise RuntimeError("no kernel for this")
    r = train_speed.measure("broken", broken, 4, setup, 1.0, torch.device("cpu"))
    assert r["error"] == "RuntimeError: no kernel for this" and r["oom_at_batch"] == [] and not r["oom"]
