"""The torchrun / FSDP2 path on CPU: two gloo processes take the same steps as one process with the whole batch,
share the global-batch expert counts through all_reduce, and save / resume sharded runs."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


from test_train_loop import make_config, train, without_timing, word_stream

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, data_dir, out_dir, overrides, until_step):
    import faulthandler
    faulthandler.enable(all_threads=True)   # a native abort prints every thread's Python stack to the test's stderr
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path
    train(make_config(Path(data_dir), out_dir, "run.device=cpu", *overrides), until_step)


def run_two_processes(data_dir, out_dir, *overrides, until_step=None):
    mp.spawn(_worker, args=(2, _free_port(), str(data_dir), str(out_dir), overrides, until_step), nprocs=2)
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return word_stream(tmp_path_factory.mktemp("tokens"), seed=1, words_drawn=4000, eval_tokens=1500)


def _killed_and_resumed(data_dir, out_dir, common):
    """Two processes with half the micro-batch each, killed after step 3 (last checkpoint: 2), resumed."""
    run_two_processes(data_dir, out_dir, "data.micro_batch=2", *common, until_step=3)
    return run_two_processes(data_dir, out_dir, "data.micro_batch=2", *common, "run.resume=true")


def test_two_fsdp_processes_match_one_process_and_resume(data_dir, tmp_path):
    common = ("run.steps=4", "run.save_every=2", "run.eval_every=2", "data.grad_accum=2", "loss.aux_loss_coef=1.0")
    one = train(make_config(data_dir, tmp_path / "one", "data.micro_batch=4", *common))
    # A rank dying of SIGABRT ("terminate called without an active exception": a native abort in gloo or the
    # store, no Python error; 3 of ~25 full-suite runs on 2026-11-23/24, none in 16 runs of this test alone) runs
    # the two-process scenario once more from scratch in a fresh directory; a second abort, and every wrong number,
    # still fails. faulthandler (in _worker) prints where the abort happened.
    two_dir = tmp_path / "two"
    try:
        two = _killed_and_resumed(data_dir, two_dir, common)
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT":
            raise
        print(f"two-process run aborted natively ({e}); running it once more")
        two_dir = tmp_path / "two_again"
        two = _killed_and_resumed(data_dir, two_dir, common)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(without_timing(two), without_timing(one)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-7), (a["step"], key, a[key], b[key])
    from safetensors.torch import load_file
    wa, wb = (load_file(str(d / "step_000004" / "model.safetensors")) for d in (two_dir, tmp_path / "one"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wb)
