"""The trainer on CPU: the loss falls, kill-and-resume reproduces the run bit for bit, checkpoints load in
transformers, global-batch balancing over micro-batches equals one big batch, optimizer groups and schedules."""
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen3next import load_model
from qwen3next.train.config import TrainConfig, apply_override
from qwen3next.train.data import write_token_file
from qwen3next.train.metrics import plot_curves
from qwen3next.train.optim import decay_groups, lr_at
from qwen3next.train.trainer import Trainer, TrainingModel

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
            linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, max_position_embeddings=256, rope_theta=10000.0)
TIMING = ("tokens_per_s", "mfu", "elapsed_s")


def word_stream(root, seed: int, words_drawn: int, eval_tokens: int):
    """A learnable token stream in root/{train,eval}.bin: random sequences of 12 fixed 'words' of 3-6 tokens."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, 64, rng.integers(3, 7)) for _ in range(12)]
    stream = np.concatenate([words[i] for i in rng.integers(0, 12, words_drawn)])
    write_token_file(str(root / "train.bin"), stream[:-eval_tokens], vocab_size=64)
    write_token_file(str(root / "eval.bin"), stream[-eval_tokens:], vocab_size=64)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return word_stream(tmp_path_factory.mktemp("tokens"), seed=0, words_drawn=7000, eval_tokens=3000)


def make_config(data_dir, out_dir, *overrides) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.fields = dict(TINY)
    for item in (f"data.train={data_dir / 'train.bin'}", f"data.eval={data_dir / 'eval.bin'}", "data.seq_len=32",
                 "data.micro_batch=4", "optim.lr=1e-2", "optim.warmup=3", "run.steps=10", "run.log_every=1",
                 "run.eval_every=5", "run.eval_batches=2", "run.save_every=0", "run.progress=false",
                 "run.plot=false", f"run.out_dir={out_dir}", *overrides):
        apply_override(cfg, item)
    return cfg


def train(cfg, until_step=None):
    trainer = Trainer(cfg)
    try:
        return trainer.train(until_step)
    finally:
        trainer.close()


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    records = train(make_config(data_dir, out, "run.save_every=5"))
    return out, records


def test_loss_falls(data_dir, tmp_path):
    records = train(make_config(data_dir, tmp_path, "run.steps=30", "data.micro_batch=8"))
    lm = [r["lm_loss"] for r in records if "lm_loss" in r]
    assert lm[0] == pytest.approx(math.log(64), abs=0.15)   # a fresh model guesses uniformly
    assert np.mean(lm[-5:]) < np.mean(lm[:3]) - 1.5, lm
    last = records[-1]
    for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "expert_load_max_mean",
                "router_entropy", "mtp_accuracy", "eval_loss", "eval_mtp_loss"):
        assert key in last and last[key] is not None, key
    assert last["mfu"] is None                               # CPU: no peak-FLOPs figure, no MFU
    assert last["eval_loss"] < math.log(64) - 1.0


def test_kill_and_resume_reproduces_the_run_exactly(full_run, data_dir, tmp_path):
    full_dir, full_records = full_run
    cfg = make_config(data_dir, tmp_path, "run.save_every=5")
    train(cfg, until_step=7)              # "killed" after step 7: the last checkpoint is step 5
    assert open(tmp_path / "latest").read().strip() == "step_000005"
    apply_override(cfg, "run.resume=true")
    train(cfg)
    resumed = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in resumed] == list(range(1, 11))   # steps 6, 7 logged once, by the resumed run
    assert without_timing(resumed) == without_timing(full_records)
    a, b = (load_file(str(d / "step_000010" / "model.safetensors")) for d in (full_dir, tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_loads_in_transformers_with_equal_logits(full_run):
    transformers = pytest.importorskip("transformers")
    ckpt = str(full_run[0] / "step_000010")
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "train_config.json", "trainer_state.pt"]
    ours = load_model(ckpt)
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(ckpt, experts_implementation="eager").float().eval()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_existing_run_needs_resume_and_resume_needs_the_same_batch(full_run, data_dir):
    out = full_run[0]
    with pytest.raises(ValueError, match="already holds a run.*run.resume=true"):
        Trainer(make_config(data_dir, out))
    with pytest.raises(ValueError, match="global_batch"):
        Trainer(make_config(data_dir, out, "run.resume=true", "data.micro_batch=2"))


def test_global_balance_over_micro_batches_equals_one_big_batch(data_dir, tmp_path):
    """grad_accum=2 x 2 sequences with global-batch balancing takes the same step as 1 x 4 sequences."""
    results = []
    for name, accum, micro in (("accum", 2, 2), ("whole", 1, 4)):
        out = tmp_path / name
        cfg = make_config(data_dir, out, "run.steps=2", f"data.grad_accum={accum}", f"data.micro_batch={micro}",
                          "loss.aux_loss_coef=1.0", "run.eval_every=0")
        records = train(cfg)
        results.append((records, load_file(str(out / "step_000002" / "model.safetensors"))))
    (ra, wa), (rb, wb) = results
    for x, y in zip(ra, rb):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key
    # the two runs sum the same terms in a different order: float32 rounding, amplified by Adam's normalisation
    # of tiny gradients, leaves ~1e-6 differences; a wrong balance moves weights by ~lr (1e-3)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_micro_balance_differs_from_global_with_accumulation(data_dir, tmp_path):
    aux = {}
    for scope in ("global", "micro"):
        cfg = make_config(data_dir, tmp_path / scope, "run.steps=1", "data.grad_accum=2", "data.micro_batch=2",
                          f"loss.balance={scope}", "run.eval_every=0")
        aux[scope] = train(cfg)[-1]["aux_loss"]
    assert aux["global"] != pytest.approx(aux["micro"], rel=1e-4)


def test_activation_checkpointing_changes_nothing(data_dir, tmp_path):
    plain = train(make_config(data_dir, tmp_path / "a", "run.steps=3", "run.eval_every=0"))
    ckpt = train(make_config(data_dir, tmp_path / "b", "run.steps=3", "run.eval_every=0",
                             "run.activation_checkpointing=true"))
    for x, y in zip(plain, ckpt):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                     rel=1e-5)


def test_mtp_head_reads_the_next_token(data_dir, tmp_path):
    trainer = Trainer(make_config(data_dir, tmp_path))
    seen = {}
    real = trainer.lm.mtp_forward

    def spy(hidden, next_ids, **kw):
        seen["next_ids"], seen["hidden"] = next_ids, hidden
        return real(hidden, next_ids, **kw)

    trainer.lm.mtp_forward = spy
    tokens = torch.arange(10)[None] + 3
    logits, mtp_logits, routers = trainer.net(tokens[:, :-1], tokens[:, 1:])
    assert torch.equal(seen["next_ids"], tokens[:, 1:])          # at position p: t_{p+1}
    assert seen["hidden"].shape == (1, 9, 32) and mtp_logits.shape == logits.shape == (1, 9, 64)
    assert len(routers) == 4 + 1                                   # 4 MoE layers + the MTP layer's MoE
    assert isinstance(trainer.net, TrainingModel)


def test_bad_setups_are_named(data_dir, tmp_path):
    small = tmp_path / "small"
    write_token_file(str(small / "train.bin"), np.arange(500) % 100, vocab_size=100)
    cfg = make_config(data_dir, tmp_path / "o1", f"data.train={small / 'train.bin'}", "data.eval=none")
    with pytest.raises(ValueError, match="token ids go up to 99, but the model's vocab_size is 64"):
        Trainer(cfg)
    cfg = make_config(data_dir, tmp_path / "o2", "model.num_experts_per_tok=9")
    with pytest.raises(ValueError, match=r"\[model\]: config: num_experts_per_tok=9 > num_experts=4"):
        Trainer(cfg)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        Trainer(make_config(data_dir, tmp_path / "o3", f"data.train={tmp_path / 'missing.bin'}"))


def test_weight_decay_groups():
    from qwen3next import ModelConfig, build_model
    model = build_model(ModelConfig(**TINY, num_nextn_predict_layers=1), device="meta")
    decay, no_decay = decay_groups(model)
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in decay
    assert "model.layers.0.mlp.experts.gate_up_proj" in decay and "model.layers.0.mlp.gate.weight" in decay
    assert "model.layers.0.input_layernorm.weight" in decay          # zero-centred: decayed towards gain 1
    assert "model.layers.3.self_attn.q_norm.weight" in decay and "mtp.pre_fc_norm_hidden.weight" in decay
    assert "model.norm.weight" in decay and "lm_head.weight" in decay
    for name in ("model.embed_tokens.weight", "model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.dt_bias",
                 "model.layers.0.linear_attn.norm.weight"):
        assert name in no_decay, name
    assert "model.embed_tokens.weight" in decay_groups(model, decay_embeddings=True)[0]
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_learning_rate_schedules():
    cfg = TrainConfig().optim
    cfg.lr, cfg.warmup, cfg.min_lr_ratio = 1.0, 10, 0.1
    cos = [lr_at(s, 110, cfg) for s in range(110)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0) and cos[10] == pytest.approx(1.0)
    assert cos[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cos[10:], cos[11:]))
    assert cos[60] == pytest.approx(0.55, abs=0.01)
    cfg.schedule, cfg.decay_fraction = "wsd", 0.2
    wsd = [lr_at(s, 110, cfg) for s in range(110)]
    assert wsd[10:88] == [1.0] * 78 and wsd[-1] == pytest.approx(0.1) and wsd[95] < 1.0


def test_plot_writes_a_png_or_warns_without_matplotlib(full_run, tmp_path):
    png = tmp_path / "curves.png"
    metrics = str(full_run[0] / "metrics.jsonl")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="matplotlib is not installed"):
            assert plot_curves(metrics, str(png)) is False
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_curves(metrics, str(png)) is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
