"""One float64 training step of a config, as one process or as one of several under torchrun: the shared
code of tests/test_torchrun.py (the 1-process reference, in the test) and of its workers (tests/ddp_worker.py,
for a config with ``_step_out``), so both run exactly the same steps."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import vqvae  # noqa: E402


def float64_step(cfg: vqvae.Config, dp=None) -> dict:
    """``cfg.batch_size`` images, one training step (with --init kmeans|data just before it, and dead-code
    restarts after it when dead_code_every is 1), everything in float64, SGD: {"grads", "state"}."""
    vqvae.seed_everything(cfg.seed)
    train_u8, _ = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg).double()
    # plain SGD: the gradients are compared directly, and an SGD update keeps their 1e-16 differences that
    # small, where Adam's g / (sqrt(v) + eps) would magnify them for near-zero gradient components
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    rt = vqvae.Runtime(torch.device("cpu"))
    rt.prepare = lambda x: x.double()                       # float64 images in: the whole step in float64
    model.encoder.register_forward_pre_hook(lambda m, args: (args[0].double(),))   # k-means init's encoder calls too
    grads = {}

    def after_backward(m):
        if dp is not None:
            dp.average_gradients(m)
        grads.update({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None})
    if dp is not None:
        dp.install(model)
    vqvae.train_epoch(model, optimizer, train_u8[:cfg.batch_size], cfg, torch.Generator().manual_seed(cfg.seed),
                      0, 2, rt=rt, after_backward=after_backward)
    return {"grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()}}

