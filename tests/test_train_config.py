"""Training config: TOML/YAML loading, dotted overrides, and errors that name the key."""
import os

import pytest

from qwen3next.train.config import TrainConfig, apply_override, load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.parametrize("name", ["tiny-cpu.toml", "default-model.toml"])
def test_example_configs_load(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.data.train.endswith("train.bin") and cfg.model.fields["num_hidden_layers"] >= 4


def test_overrides_parse_values_and_reach_model_fields():
    cfg = load_config(None, ["optim.lr=3e-4", "optim.betas=[0.9, 0.99]", "run.out_dir=runs/x y",
                             "model.hidden_size=128", "loss.aux_loss_coef=none", "run.activation_checkpointing=true",
                             "optim.weight_decay=0", "model.layer_types=['linear_attention', 'full_attention']",
                             "data.train = data/t.bin"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.9, 0.99] and cfg.run.out_dir == "runs/x y"
    assert cfg.model.fields == {"hidden_size": 128, "layer_types": ["linear_attention", "full_attention"]}
    assert cfg.loss.aux_loss_coef is None and cfg.run.activation_checkpointing is True
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.data.train == "data/t.bin"
    assert cfg.to_dict()["model"]["hidden_size"] == 128


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ("optimizer.lr=1", r"unknown section 'optimizer'.*did you mean 'optim'"),
    ("run.steps=abc", r"run.steps expects an integer, got 'abc'"),
    ("run.steps=1.5", r"run.steps expects an integer"),
    ("run.resume=1", r"run.resume expects true or false"),
    ("run.dtype=fp16", r"run.dtype: expected one of 'auto', 'bf16', 'fp32', got 'fp16'"),
    ("optim.schedule=linear", r"optim.schedule: expected one of 'cosine', 'wsd'"),
    ("optim.betas=[0.9]", r"optim.betas must be two numbers"),
    ("optim.warmup=-1", r"optim.warmup must be >= 0, got -1"),
    ("model.hidden_size=wide", r"model.hidden_size expects an integer, got 'wide'"),
    ("model.hiden_size=3", r"did you mean 'model.hidden_size'"),
    ("run.steps", r"has no '='"),
    ("steps=3", r"must name its section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_file_errors_name_the_file_and_key(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("[run]\nstepz = 3\n")
    with pytest.raises(ValueError, match=r"a.toml: unknown key 'run.stepz' \(did you mean 'run.steps'\?\)"):
        load_config(str(bad_key))
    bad_section = tmp_path / "b.toml"
    bad_section.write_text("[trainer]\nsteps = 3\n")
    with pytest.raises(ValueError, match=r"unknown section \[trainer\]"):
        load_config(str(bad_section))
    broken = tmp_path / "c.toml"
    broken.write_text("[run\n")
    with pytest.raises(ValueError, match="c.toml: not valid TOML"):
        load_config(str(broken))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(str(tmp_path / "nope.toml"))


def test_yaml_config_when_pyyaml_is_installed(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  source: qwen3-next-80b-a3b\n  num_hidden_layers: 2\noptim:\n  lr: 0.01\n"
                    "loss:\n  balance: micro\n")
    cfg = load_config(str(path), ["run.steps=7"])
    assert cfg.model.source == "qwen3-next-80b-a3b" and cfg.model.fields == {"num_hidden_layers": 2}
    assert cfg.optim.lr == 0.01 and cfg.loss.balance == "micro" and cfg.run.steps == 7


def test_override_on_a_loaded_config():
    cfg = TrainConfig()
    apply_override(cfg, "data.grad_accum=4")
    assert cfg.data.grad_accum == 4
