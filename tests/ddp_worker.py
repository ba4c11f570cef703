"""Run by the distributed tests under torchrun, one launch for all of them (each launch costs seconds of
interpreter start-up): takes configs as JSON on the command line and, in this process group, one after the
other,
  * with ``_step_out: DIR``: one float64 training step (tests/ddp_step.py), saved as DIR/<name>.rank<R>.pt;
  * otherwise ``train(cfg)`` (with ``resume: PATH``: the run resumed from PATH with the other keys as overrides),
    saving what every process ends with, <out_dir>/<name>.rank<R>.pt (model state) and .json (final metrics).
Test-only keys of one config: ``_stop_rank: R``: process R alone gets a stop request (as from a signal) before
its fifth batch of that run, and the run's TrainingInterrupted is printed and the next config goes on;
``_fail_rank: R``: process R raises in that run's third training step (a crash on one process: it ends the
job, so it comes last). With BAVQ_TEST_FLOAT64=1, everything runs in float64 (torch's default dtype; see
conftest's ``float64`` fixture)."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import vqvae  # noqa: E402
import vqvae_experiment  # noqa: E402
from ddp_step import float64_step  # noqa: E402

rank = int(os.environ.get("RANK", "0"))
if os.environ.get("BAVQ_TEST_FLOAT64") == "1":
    torch.set_default_dtype(torch.float64)
now = {"stop": False, "fail": False, "polls": 0, "steps": 0}      # the test-only settings of the current config
real_finish = vqvae_experiment._finish
real_backward = vqvae._backward_and_step
real_poll = vqvae_experiment._StopFlag.__call__


def finish_and_keep(run):
    final = real_finish(run)
    out = Path(run.cfg.out_dir) / f"{run.cfg.resolved_name()}.rank{rank}"
    torch.save(run.model.state_dict(), f"{out}.pt")
    Path(f"{out}.json").write_text(json.dumps(vqvae_experiment._plain(final)))
    return final


def crash_in_third_step(*args, **kw):
    now["steps"] += 1
    if now["fail"] and now["steps"] == 3:
        raise RuntimeError(f"simulated crash on process {rank}")
    return real_backward(*args, **kw)


def stop_before_fifth_batch(self):
    now["polls"] += 1
    if now["stop"] and now["polls"] == 5:
        self.requested = True
    return real_poll(self)


vqvae_experiment._finish = finish_and_keep
vqvae._backward_and_step = crash_in_third_step
vqvae_experiment._StopFlag.__call__ = stop_before_fifth_batch

for overrides in map(json.loads, sys.argv[1:]):
    now.update(stop=overrides.pop("_stop_rank", None) == rank, fail=overrides.pop("_fail_rank", None) == rank,
               polls=0, steps=0)
    step_out = overrides.pop("_step_out", None)
    if step_out is not None:
        import torch.distributed as dist
        cfg = vqvae.make_config(overrides).validate()
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dp = vqvae_experiment.DataParallel(dist.get_rank(), dist.get_world_size())
        torch.save(float64_step(cfg, dp), Path(step_out) / f"{cfg.name}.rank{rank}.pt")
        continue
    resume = overrides.pop("resume", None)
    cfg = vqvae.resume_config(resume, overrides) if resume else vqvae.make_config(overrides)
    try:
        vqvae.train(cfg.validate())
    except vqvae.TrainingInterrupted as e:
        print(f"[process {rank}] {e}", flush=True)

if torch.distributed.is_initialized():                # every result is on disk; then leave without tearing gloo down:
    torch.distributed.barrier()                       # its teardown at exit sometimes aborts the process ("terminate
sys.stdout.flush()                                    # called without an active exception") after the work is done
sys.stderr.flush()
os._exit(0)
