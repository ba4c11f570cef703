"""Run by the distributed tests under torchrun: trains each config given as JSON on the command line
(one train(cfg) per config, all in this process group) and saves what every process ends with, so
the test can compare processes: <out_dir>/<name>.rank<R>.pt (model state) and .json (final metrics).
With BAVQ_TEST_FAIL_RANK=R, process R raises in its third training step (a crash on one process); with
BAVQ_TEST_STOP_RANK=R, process R alone gets a stop request (as from a signal) before its fifth batch; with
BAVQ_TEST_FLOAT64=1, everything runs in float64 (torch's default dtype; see conftest's ``float64`` fixture)."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import vqvae  # noqa: E402
import vqvae_experiment  # noqa: E402

rank = int(os.environ.get("RANK", "0"))
if os.environ.get("BAVQ_TEST_FLOAT64") == "1":
    torch.set_default_dtype(torch.float64)
fail_rank = os.environ.get("BAVQ_TEST_FAIL_RANK")
real_finish = vqvae_experiment._finish


def finish_and_keep(run):
    final = real_finish(run)
    out = Path(run.cfg.out_dir) / f"{run.cfg.resolved_name()}.rank{rank}"
    torch.save(run.model.state_dict(), f"{out}.pt")
    Path(f"{out}.json").write_text(json.dumps(vqvae_experiment._plain(final)))
    return final


vqvae_experiment._finish = finish_and_keep
if fail_rank is not None and int(fail_rank) == rank:
    real_backward = vqvae._backward_and_step
    calls = {"n": 0}

    def crash(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError(f"simulated crash on process {rank}")
        return real_backward(*args, **kw)
    vqvae._backward_and_step = crash

stop_rank = os.environ.get("BAVQ_TEST_STOP_RANK")
if stop_rank is not None and int(stop_rank) == rank:
    real_call = vqvae_experiment._StopFlag.__call__
    polls = {"n": 0}

    def request_once(self):
        polls["n"] += 1
        if polls["n"] == 5:
            self.requested = True
        return real_call(self)
    vqvae_experiment._StopFlag.__call__ = request_once

for overrides in map(json.loads, sys.argv[1:]):
    resume = overrides.pop("resume", None)
    cfg = vqvae.resume_config(resume, overrides) if resume else vqvae.make_config(overrides)
    vqvae.train(cfg.validate())
