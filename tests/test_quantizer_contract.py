"""The Quantizer contract is the only thing the rest of the library knows about a quantizer:
a quantizer defined here, outside vqvae.py, trains end to end through train(cfg) once it is
registered, and nothing in vqvae.py outside the quantizers tests a quantizer's name or class."""
import ast
import json

import pytest
import torch
import torch.nn.functional as F

import vqvae
from conftest import ROOT, tiny_config


class FrozenCodesQuantizer(vqvae.Quantizer):
    """Nearest of K fixed random codes (a frozen codebook), straight-through, with a commitment
    loss weighted by the Config field ``commitment_cost`` and a schedule it reports as an extra metric."""
    loss_names = ("commitment_loss",)

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.commitment_cost = num_embeddings, embedding_dim, commitment_cost
        g = torch.Generator().manual_seed(0)
        self.register_buffer("codes", torch.randn(num_embeddings, embedding_dim, generator=g))
        self.register_buffer("t", torch.zeros(()))

    def set_schedule(self, t, step=0):
        self.t.fill_(t)

    def extra_metrics(self):
        return {"schedule_t": float(self.t)}

    def forward(self, z):
        B, D, H, W = z.shape
        z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, D)                 # (B*H*W, D)
        idx = torch.cdist(z_flat, self.codes).argmin(1)                        # (B*H*W,)
        q = self.codes[idx]
        z_q = (z_flat + (q - z_flat).detach()).reshape(B, H, W, D).permute(0, 3, 1, 2)
        counts = vqvae.code_histogram(idx, self.num_embeddings)
        info = {"code_indices": idx.reshape(B, H, W), "code_counts": counts,
                "perplexity": vqvae.perplexity_from_counts(counts), "usage_rate": vqvae.usage_from_counts(counts)}
        return z_q, {"commitment_loss": self.commitment_cost * F.mse_loss(z_flat, q)}, info


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(vqvae.QUANTIZERS, "frozen_codes", FrozenCodesQuantizer)


@pytest.mark.slow
def test_a_quantizer_defined_outside_vqvae_trains_end_to_end(registered, tmp_path):
    cfg = tiny_config(quantizer="frozen_codes", epochs=2, commitment_cost=0.5, out_dir=str(tmp_path))
    final = vqvae.train(cfg)
    run = tmp_path / cfg.resolved_name()
    assert json.loads((run / "final_metrics.json").read_text())["psnr"] == pytest.approx(final["psnr"])
    assert final["commitment_loss"] > 0 and 0 < final["usage_rate"] <= 1 and final["schedule_t"] == 1.0
    history = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"train/commitment_loss", "val/commitment_loss", "train/schedule_t", "val/schedule_t"} <= set(history[0])
    model = vqvae.build_model(cfg)
    assert model.quantizer.commitment_cost == 0.5                     # its Config field reached it
    # resume works for it too: a 3-epoch continuation of the checkpointed run
    resumed = vqvae.train(vqvae.resume_config(run, {"epochs": 3, "overwrite": True}))
    assert resumed["epoch"] == 3
    # it has no codebook, so the codebook remedies are refused by asking the class
    with pytest.raises(vqvae.BavqError, match="not to frozen_codes, which has no codebook"):
        tiny_config(quantizer="frozen_codes", dead_code_threshold=1.0)
    # and validation runs in big batches, because its codes do not depend on the batch
    assert vqvae.default_val_batch_size(cfg) == 1024


def test_the_cli_offers_a_registered_quantizer(registered):
    import train as cli
    assert cli.config_from_args(["--quantizer", "frozen_codes", "--dataset", "fake"]).quantizer == "frozen_codes"


MODULES = ("vqvae.py", "vqvae_experiment.py", "vqvae_grid.py")


def _outside_quantizers(tree):
    """Top-level functions and classes of a module that are not quantizers (nor the Config fields)."""
    quantizer_classes = {n for n, c in vars(vqvae).items() if isinstance(c, type) and issubclass(c, vqvae.Quantizer)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in quantizer_classes | {"Config"}:
            yield node, quantizer_classes


@pytest.mark.parametrize("module", MODULES)
def test_nothing_outside_a_quantizer_tests_its_name_or_class(module):
    tree = ast.parse((ROOT / module).read_text())
    names = set(vqvae.QUANTIZERS)
    offences = []
    for node, qclasses in _outside_quantizers(tree):
        for sub in ast.walk(node):
            if isinstance(sub, ast.Compare):
                consts = [c.value for c in [sub.left, *sub.comparators] if isinstance(c, ast.Constant)]
                consts += [e.value for c in sub.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                offences += [f"{node.name}: compares with '{c}'" for c in consts if c in names]
            if isinstance(sub, ast.Call) and getattr(sub.func, "id", None) in ("isinstance", "issubclass"):
                classes = ast.walk(sub.args[1])
                offences += [f"{node.name}: isinstance(..., {c.id})" for c in classes
                             if isinstance(c, ast.Name) and c.id in qclasses - {"Quantizer", "CodebookQuantizer"}]
    assert offences == []


def test_the_name_check_sees_a_name_test():
    """The check above would see `cfg.quantizer == "ba_vq"` and `isinstance(q, BAQuantizer)`."""
    src = 'def f(cfg, q):\n    return cfg.quantizer == "ba_vq" or isinstance(q, BAQuantizer)\n'
    tree = ast.parse(src)
    found = [s for s in ast.walk(tree) if isinstance(s, ast.Compare)
             and any(isinstance(c, ast.Constant) and c.value in vqvae.QUANTIZERS for c in s.comparators)]
    calls = [s for s in ast.walk(tree) if isinstance(s, ast.Call) and getattr(s.func, "id", None) == "isinstance"]
    assert found and calls and calls[0].args[1].id == "BAQuantizer"
