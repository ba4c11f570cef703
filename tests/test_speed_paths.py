"""The speed paths compute what the plain paths compute, checked on the CPU as far as PyTorch allows.

The fast path (device-resident data batched by index, fused Blahut-Arimoto, channels_last) and
the plain path (DataLoader, autograd through every BA iteration, contiguous NCHW) compute the same
thing: a few float32 steps on the CPU give the same losses and the same code indices. The other
GPU-side options are run here on the CPU as far as PyTorch allows: bf16 autocast, the fp16
gradient-scaler branch, torch.compile (Inductor's CPU backend), and an audit of host reads standing in
for torch.cuda.set_sync_debug_mode. Not covered without a GPU: the fused CUDA AdamW kernel, CUDA
graphs (--compile_mode reduce-overhead), cuDNN autotuning and the timings themselves."""
import os
import shutil
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vqvae
import vqvae_fused
from conftest import Float64Runtime, record_code_indices, record_inputs, tiny_config


def run_steps(cfg, n_images=192, channels_last=False, float64=False):
    """2 epochs x 3 training steps of ``cfg`` on the CPU (float64 throughout with ``float64``): the epochs'
    metrics, the code indices and encoder inputs of every step, and the model."""
    train_u8, _ = vqvae.load_dataset(cfg)
    rt = (Float64Runtime if float64 else vqvae.Runtime)(torch.device("cpu"), channels_last=channels_last)
    model, opt = vqvae.setup_model(cfg, torch.device("cpu"), rt)
    if float64:
        model.double()                                          # the same Parameters: the optimizer keeps them
    seen, fed = record_code_indices(model), record_inputs(model)
    g = torch.Generator().manual_seed(cfg.seed)
    metrics = []
    step = 0
    for _ in range(2):                                          # 2 epochs x 3 steps
        m, step = vqvae.train_epoch(model, opt, train_u8[:n_images], cfg, g, step, 6, rt=rt)
        metrics.append(m)
    return metrics, seen, model, fed


def assert_same_run(a, b, rel):
    """Two runs of ``run_steps``: the same images in the same order and the same codes, exactly; every loss and
    metric, and every weight and buffer, within ``rel`` (relative)."""
    (m_a, idx_a, model_a, fed_a), (m_b, idx_b, model_b, fed_b) = a, b
    assert len(fed_a) == len(fed_b) == len(idx_a) == len(idx_b) == 6
    for x, y in zip(fed_a, fed_b):
        assert torch.equal(x, y)                                # the data order: exact, whatever the CPU
    for x, y in zip(idx_a, idx_b):
        assert torch.equal(x, y)
    assert list(m_a[0]) == list(m_b[0])
    for x, y in zip(m_a, m_b):
        for k, v in x.items():
            if isinstance(v, float):
                assert v == pytest.approx(y[k], rel=rel, abs=1e-12), k
    assert list(model_a.state_dict()) == list(model_b.state_dict())
    for (n, p), (_, q) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=rel, atol=1e-12, msg=n)


@pytest.mark.parametrize("quantizer", ["vq_ema", "vq", "ba_vq", "fsq"])
def test_fast_and_plain_paths_agree(quantizer):
    """The fast path (uint8 data on the device batched by index, the fused BA pass in row chunks, NHWC
    convolutions) and the plain path (a DataLoader over the same order, autograd through every BA iteration,
    NCHW) compute the same training, compared in float64: they sum in other orders, which leaves differences
    near 1e-16 that six Adam steps keep below 1e-9 (measured: under 1e-12), so that the same images in the
    same order, the same codes at every step, and every metric and weight within 1e-9 hold on any CPU. A wrong
    data order fails the first check; a missing gradient term, the codes or weights of the steps after it.
    (float32 differs from float64 only in the rounding, which test_ba_vq.py bounds for the fused pass.)"""
    fast = tiny_config(quantizer=quantizer, data_path="device", ba_impl="fused", ba_chunk_rows=1000)
    plain = tiny_config(quantizer=quantizer, data_path="loader", ba_impl="autograd", num_workers=0)
    a = run_steps(fast, channels_last=True, float64=True)       # NHWC convolutions too
    assert a[2].encoder.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert a[2].encoder.net[0].weight.dtype == torch.float64
    assert_same_run(a, run_steps(plain, float64=True), rel=1e-9)


def test_validation_batch_size_default():
    """No built-in quantizer's codes depend on the batch any more (BA-VQ evaluates with its running
    marginal), so every one validates in batches of 1024."""
    assert vqvae.default_val_batch_size(tiny_config(quantizer="ba_vq", batch_size=64)) == 1024
    assert vqvae.default_val_batch_size(tiny_config(quantizer="vq_ema", batch_size=64)) == 1024
    assert vqvae.default_val_batch_size(tiny_config(quantizer="vq_ema", val_batch_size=50)) == 50


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_bf16_autocast_trains_and_keeps_quantizer_maths_in_float32(quantizer):
    """--amp bf16 (here on the CPU): the network runs in bf16, the quantizer's buffers and losses stay
    float32 and training still lowers the loss."""
    cfg = tiny_config(quantizer=quantizer, amp="bf16")
    rt = vqvae.make_runtime(cfg, torch.device("cpu"))
    assert rt.amp_dtype == torch.bfloat16
    train_u8, val_u8 = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    with rt.autocast():
        z = model.encoder(vqvae.to_float(train_u8[:4]))
        assert z.dtype == torch.bfloat16
        _, losses, _ = model.quantizer(z)
    assert all(v.dtype == torch.float32 for v in losses.values())
    g = torch.Generator().manual_seed(0)
    first, step = vqvae.train_epoch(model, opt, train_u8, cfg, g, 0, 8, rt=rt)
    last, _ = vqvae.train_epoch(model, opt, train_u8, cfg, g, step, 8, rt=rt)
    assert last["recon_loss"] < first["recon_loss"]
    for b in model.quantizer.buffers():
        assert b.dtype in (torch.float32, torch.long)
    m = vqvae.validate(model, val_u8, 64, rt=rt)
    assert 0 < m["psnr"] < 100


def test_fp16_needs_cuda():
    with pytest.raises(vqvae.BavqError, match="fp16 needs a CUDA GPU"):
        vqvae.make_runtime(tiny_config(amp="fp16"), torch.device("cpu"))
    assert vqvae.make_runtime(tiny_config(), torch.device("cpu")).amp_dtype is None   # auto = off on CPU


@pytest.mark.slow
def test_benchmark_runs_on_cpu_and_writes_its_table(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--device", "cpu", "--dataset", "fake",
                        "--train_images", "128", "--val_images", "64", "--hidden_dim", "8", "--latent_dim", "8",
                        "--codebook_sizes", "16", "32", "--batch_size", "64", "--repeats", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    assert "train s/epoch" in r.stdout and "val s/pass" in r.stdout and "img/s" in r.stdout
    res = json.loads(out.read_text())
    assert res["device"].startswith("cpu")
    rows = res["results"]
    assert [(x["quantizer"], x["K"]) for x in rows] == [("vq_ema", 16), ("vq_ema", 32), ("ba_vq", 16), ("ba_vq", 32)]
    for x in rows:
        assert x["train_images"] == 128 and x["val_images"] == 64
        assert x["train_s_per_epoch"] > 0 and x["val_s_per_pass"] > 0 and x["peak_memory_mb"] > 0
        assert x["train_images_per_s"] == pytest.approx(128 / x["train_s_per_epoch"])
        assert x["repeats"] == 2 and len(x["train_s_per_epoch_repeats"]) == 2
        assert x["train_s_per_epoch"] == pytest.approx(sum(x["train_s_per_epoch_repeats"]) / 2)
    assert [x["train_ratio"] for x in rows[:2]] == [1.0, 1.0] and rows[2]["ratio_to"] == "vq_ema"


def test_benchmark_repeats_give_the_median_the_spread_and_the_ratio_to_the_first_quantizer():
    import benchmark
    def run(q, K, train, val, mem):
        return {"quantizer": q, "K": K, "train_images": 100, "val_images": 10, "train_s_per_epoch": train,
                "val_s_per_pass": val, "peak_memory_mb": mem}
    r = benchmark.merge_repeats([run("ba_vq", 8, 3.0, 0.1, 5), run("ba_vq", 8, 1.0, 0.3, 9),
                                 run("ba_vq", 8, 2.0, 0.2, 7)])
    assert (r["train_s_per_epoch"], r["val_s_per_pass"], r["peak_memory_mb"]) == (2.0, 0.2, 9)
    assert r["train_s_per_epoch_repeats"] == [3.0, 1.0, 2.0] and r["train_spread"] == pytest.approx(2.0)
    assert r["train_images_per_s"] == 50.0 and r["epoch_plus_val_s"] == pytest.approx(2.2)
    assert benchmark.merge_repeats([run("q", 8, 1.0, 0.1, 1), run("q", 8, 2.0, 0.3, 1)])["train_s_per_epoch"] == 1.5
    rows = [run("vq_ema", 8, 2.0, 0.1, 1), run("vq_ema", 16, 4.0, 0.1, 1), run("ba_vq", 8, 3.0, 0.1, 1),
            run("ba_vq", 16, 10.0, 0.1, 1)]
    benchmark.add_ratios(rows)
    assert [r["train_ratio"] for r in rows] == [1.0, 1.0, 1.5, 2.5]


# ---------------------------------------------------------------------------- host synchronisation
# On a GPU, reading a device value on the host (.item(), .cpu(), bool(t), printing, boolean-mask
# indexing, nonzero, bincount's size check, ...) waits for every queued kernel. The loop may do that
# once per epoch and once per progress refresh, never once per step. torch.cuda.set_sync_debug_mode
# needs a GPU; this audit looks for the same calls on the CPU at two levels: Python-level tensor
# methods (a TorchFunctionMode: .cpu(), .tolist(), printing, ...) and ATen operators (a
# TorchDispatchMode, which also sees inside backward passes: _local_scalar_dense is every .item() /
# bool() / int() / float(), nonzero is every boolean mask, ...). A call counts when the innermost
# frame outside PyTorch is vqvae.py, unless the call came through torch.optim (the CPU optimizer
# reads its step counters, which live on the host; the CUDA run uses the fused kernel).

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
SYNC_METHODS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__",
                "__repr__", "__str__", "equal", "allclose", "is_nonzero"}
SYNC_ATEN = {"_local_scalar_dense", "nonzero", "nonzero_static", "argwhere", "masked_select", "_unique", "_unique2",
             "unique_dim", "unique_consecutive", "bincount", "repeat_interleave", "equal", "is_nonzero"}


def _has_bool_index(obj) -> bool:
    if torch.is_tensor(obj):
        return obj.dtype == torch.bool
    if isinstance(obj, (tuple, list)):
        return any(_has_bool_index(o) for o in obj)
    return False


METHOD_FILES = (vqvae.__file__, vqvae_fused.__file__)          # the method and its fused fast path


def _vqvae_line(frame):
    """(file, line) of the method (vqvae.py or vqvae_fused.py) responsible for a call, or None (the call is
    PyTorch's own)."""
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        if frame.f_code.co_filename.startswith(os.path.join(TORCH_DIR, "optim")):
            return None
        frame = frame.f_back
    if frame is None or frame.f_code.co_filename not in METHOD_FILES:
        return None
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


class _MethodAudit(torch.overrides.TorchFunctionMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        caller = sys._getframe(1)
        if name == "cpu" or (name == "to" and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))):
            # a copy to the host, when vqvae.py asks for it (PyTorch's own .to(device) calls move tensors
            # to their parameters' device, which is the CPU only in this test)
            if caller.f_code.co_filename in METHOD_FILES:
                self.calls.append((name, f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}"))
        elif name in SYNC_METHODS or (name == "where" and len(args) + len(kwargs) == 1):
            line = _vqvae_line(caller)
            if line is not None:
                self.calls.append((name, line))
        return func(*args, **kwargs)


class _AtenAudit(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_ATEN or (name in ("index", "index_put", "index_put_") and _has_bool_index(args[1:2])):
            line = _vqvae_line(sys._getframe(1))
            if line is not None:
                self.calls.append((name, line))
        return func(*args, **kwargs)


class SyncAudit:
    """``with SyncAudit() as audit: ...`` then ``audit.calls``: (op, "file:line" in vqvae.py or vqvae_fused.py) of
    every host read."""

    def __enter__(self):
        self.calls = []
        self._modes = [_MethodAudit(self.calls), _AtenAudit(self.calls)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def test_the_audit_sees_host_reads_in_methods_operators_and_backward_passes():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * float(g.sum())                               # a host read inside a backward pass
    x = torch.randn(4, requires_grad=True)
    mask = x > 0
    code = compile("\n".join([
        "y = ReadsInBackward.apply(x)",                              # 1: no read
        "y.sum().backward()", "f'{x.sum():.3f}'", "x[mask]", "torch.where(mask)", "x.detach().cpu()",
        "int(x.argmax())", "torch.bincount(mask.long())", "x.detach().unique()",   # 2-9: one or more reads each
        "opt = torch.optim.Adam([x], lr=0.1)", "opt.step()",         # 10-11: the CPU Adam reads its step count
        "x.detach().to(torch.float64) + torch.nn.utils.clip_grad_norm_([x], 1.0)"]),   # 12: no read
        vqvae.__file__, "exec")                                      # as if the lines were in vqvae.py
    with SyncAudit() as audit:
        exec(code, {"torch": torch, "x": x, "mask": mask, "ReadsInBackward": ReadsInBackward})
    assert {line for _, line in audit.calls} == {f"vqvae.py:{i}" for i in range(2, 10)}, audit.calls


SYNC_CASES = {
    "vq_ema": dict(quantizer="vq_ema", dead_code_threshold=1.0, dead_code_every=1, vq_loss_warmup_epochs=1.0),
    "vq": dict(quantizer="vq", dead_code_threshold=1.0, dead_code_every=1, gradient_estimator="rotation"),
    "ba_vq": dict(quantizer="ba_vq", dead_code_threshold=1.0, dead_code_every=1, cosine=True,
                  vq_loss_warmup_epochs=1.0),
    "ba_vq_autograd": dict(quantizer="ba_vq", ba_impl="autograd"),
    "fsq": dict(quantizer="fsq"),
}


def audited_epoch(cfg, n_images):
    train_u8, _ = vqvae.load_dataset(cfg)
    assert train_u8.shape[0] >= n_images
    model = vqvae.build_model(cfg)
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with SyncAudit() as audit:
        vqvae.train_epoch(model, opt, train_u8[:n_images], cfg, g, 0, 100)
    return sorted(audit.calls)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_training_step_never_reads_the_device_from_the_host(case, monkeypatch):
    """On the CPU as a stand-in for a GPU: BA-VQ's fused forward is audited in the form a GPU runs (log-space
    column sums); the CPU's linear column sums read which columns need the log-space fallback, once per BA
    iteration, by design (free on the CPU), and that read is the only one they add."""
    cfg = tiny_config(**SYNC_CASES[case], grad_clip=1.0, progress_every=1000, train_subset=6 * 64)
    if case == "ba_vq":
        cpu_three = audited_epoch(cfg, 3 * 64)
        monkeypatch.setattr(vqvae_fused, "_linear_sums_by_default", lambda device, kernels: False)
        three = audited_epoch(cfg, 3 * 64)
        extra = Counter(cpu_three) - Counter(three)
        assert {op for op, _ in extra} == {"nonzero"} and sum(extra.values()) == 3 * cfg.ba_iterations, extra
    three, six = audited_epoch(cfg, 3 * 64), audited_epoch(cfg, 6 * 64)
    grown = Counter(six) - Counter(three)
    assert not grown, f"host reads (op, line in vqvae.py) that grow with the number of steps: {dict(grown)}"
    assert Counter(six) == Counter(three)
    # what remains is the fixed read-out at the end of the epoch (means, histogram, gradient norms)
    # the audit does see per-step reads: a progress refresh on every step reads once per step
    every = audited_epoch(vqvae.make_config({**vars(cfg), "progress_every": 1}).validate(), 6 * 64)
    assert len(every) > len(six)


@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq", "fsq"])
def test_validation_reads_the_device_once_per_pass(quantizer):
    cfg = tiny_config(quantizer=quantizer)
    _, val_u8 = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    counts = []
    for n in (2 * 16, 4 * 16):
        with SyncAudit() as audit:
            vqvae.validate(model, val_u8[:n], 16)
        counts.append(sorted(audit.calls))
    assert counts[0] == counts[1]


# ---------------------------------------------------------------------------- fp16 and torch.compile


def _fp16_runtime():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    except (AttributeError, TypeError, RuntimeError):                     # PyTorch without a CPU GradScaler
        pytest.skip("this PyTorch has no CPU GradScaler")
    return vqvae.Runtime(torch.device("cpu"), torch.float16, scaler)


@pytest.mark.slow
@pytest.mark.parametrize("bad_steps", [set(), {1}, {0, 1, 2, 3}])
def test_fp16_gradient_scaler_skips_overflowing_steps(bad_steps):
    """The --amp fp16 branch of train_epoch (scaled backward, unscale before clipping, skipped steps),
    run on the CPU (PyTorch's GradScaler works there; only make_runtime limits fp16 to CUDA). An
    infinite gradient at a step makes the scaler skip it: counted in skipped_steps, left out of the
    gradient-norm mean, the scale halves, and a run whose every step overflows leaves the weights as
    they were. Without overflows the losses and the (unscaled) gradient norm are float32's to fp16
    rounding."""
    rt = _fp16_runtime()
    cfg = tiny_config(quantizer="vq_ema", grad_clip=1.0, train_subset=128, batch_size=32)   # 4 steps
    train_u8, _ = vqvae.load_dataset(cfg)
    model, opt = vqvae.setup_model(cfg, torch.device("cpu"), rt)
    start = {k: v.clone() for k, v in model.named_parameters()}
    calls = []

    def overflow_some(g):
        calls.append(1)
        return g * float("inf") if len(calls) - 1 in bad_steps else g
    model.decoder.net[-1].weight.register_hook(overflow_some)
    m, _ = vqvae.train_epoch(model, opt, train_u8, cfg, torch.Generator().manual_seed(0), 0, 4, rt=rt)
    assert len(calls) == 4
    assert m["skipped_steps"] == len(bad_steps)
    assert rt.scaler.get_scale() == 2.0 ** 10 * 0.5 ** len(bad_steps)   # backoff 0.5 per overflow
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if not bad_steps:
        f32 = vqvae.setup_model(cfg, torch.device("cpu"), vqvae.Runtime(torch.device("cpu")))
        m32, _ = vqvae.train_epoch(*f32, train_u8, cfg, torch.Generator().manual_seed(0), 0, 4)
        assert m["grad_norm"] == pytest.approx(m32["grad_norm"], rel=1e-2)      # unscaled before the norm
        assert m["loss"] == pytest.approx(m32["loss"], rel=1e-3)
    if len(bad_steps) == 4:
        assert m["grad_norm"] == 0.0
        for k, p in model.named_parameters():
            assert torch.equal(p, start[k]), k
    else:
        assert 0 < m["grad_norm"] < float("inf")
        assert not torch.equal(model.decoder.net[-1].weight, start["decoder.net.6.weight"])


def test_compile_mode_reaches_torch_compile(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    vqvae.setup_model(tiny_config(compile=True, compile_mode="reduce-overhead"), torch.device("cpu"),
                      vqvae.Runtime(torch.device("cpu")))
    assert seen == [("Encoder", {"mode": "reduce-overhead"}), ("Decoder", {"mode": "reduce-overhead"})]
    with pytest.raises(vqvae.BavqError, match="compile_mode 'fast' is unknown"):
        tiny_config(compile_mode="fast")


needs_compiler = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                                    reason="torch.compile on the CPU needs a C++ compiler")


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_compiled_model_marks_a_cuda_graph_step_per_training_step_and_eval_batch(monkeypatch, compiled):
    """With CUDA graphs (--compile_mode reduce-overhead) a graph's outputs live until the next marked
    step: the loop marks one before every training step, validation batch and k-means/picture forward
    (so a batch's outputs are never overwritten while in use), and nothing when not compiled."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = tiny_config(quantizer="ba_vq", kmeans_batches=2, init="kmeans")
    train_u8, val_u8 = vqvae.load_dataset(cfg)
    model = vqvae.build_model(cfg)
    model.compiled = compiled
    opt = vqvae.make_optimizer(model, cfg, torch.device("cpu"))
    vqvae.train_epoch(model, opt, train_u8[:4 * 64], cfg, torch.Generator().manual_seed(0), 0, 4)  # k-means first
    vqvae.validate(model, val_u8[:48], 16)
    assert len(marks) == (2 + 4 + 3 if compiled else 0)


@pytest.mark.slow
@needs_compiler
def test_compiled_ba_kernels_equal_the_eager_ones():
    """The torch.compile'd fused-BA chunk functions give the eager outputs, indices and gradients of z and E, in
    float64 (compiled reductions sum in another order: differences near 1e-16, so the codes are the same and the
    rest within 1e-10 on any CPU), at the shapes of a training step of ``tiny_config`` (N = 64 x 8 x 8 latents of
    16 dims, K = 32, 5 iterations, one chunk): the compiled step of test_compiled_model_matches_eager[ba_vq]
    then reuses these kernels from Inductor's cache instead of compiling them again (the suite's time)."""
    cfg = tiny_config(quantizer="ba_vq")
    g = torch.Generator().manual_seed(0)
    N, D, K = cfg.batch_size * 8 * 8, cfg.latent_dim, cfg.codebook_size
    z0 = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.5
    E0 = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.5
    w = torch.randn(N, D, generator=g, dtype=torch.float64)
    out = {}
    for name, kernels in (("eager", None), ("compiled", vqvae_fused.compiled_ba_kernels())):
        z, E = z0.clone().requires_grad_(True), E0.clone().requires_grad_(True)
        zq, lq, idx = vqvae_fused.ba_soft_quantize(z, E, torch.tensor(3.0, dtype=torch.float64), cfg.ba_iterations, 0,
                                             kernels)
        ((w * zq).sum() - (lq.exp() * lq).sum()).backward()
        out[name] = (zq.detach(), lq.detach(), idx, z.grad, E.grad)
    for a, b in zip(out["eager"], out["compiled"]):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(a.abs().max()))
        else:
            assert torch.equal(a, b)
    assert out["eager"][3].abs().sum() > 0 and out["eager"][4].abs().sum() > 0


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("quantizer", ["vq_ema", "ba_vq"])
def test_compiled_model_matches_eager(quantizer):
    """--compile (Inductor, here on the CPU; for BA-VQ also its chunk functions) trains as eager does, compared
    in float64 (see test_fast_and_plain_paths_agree: the compiled kernels' other summation orders leave
    differences near 1e-16): the same images, the same codes, every metric and weight within 1e-9 after six
    steps; state_dict keys are unchanged (checkpoints interchange); validation gives the same PSNR."""
    eager = tiny_config(quantizer=quantizer)
    compiled = tiny_config(quantizer=quantizer, compile=True)
    a, b = run_steps(eager, float64=True), run_steps(compiled, float64=True)
    assert (getattr(b[2].quantizer, "_ba_kernels", None) is not None) == (quantizer == "ba_vq")
    assert_same_run(a, b, rel=1e-9)
    _, val_u8 = vqvae.load_dataset(eager)
    rt = Float64Runtime(torch.device("cpu"))
    assert vqvae.validate(b[2], val_u8, 64, rt=rt)["psnr"] == pytest.approx(vqvae.validate(a[2], val_u8, 64, rt=rt)["psnr"],
                                                                         rel=1e-9)


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--batch_size", "0"], ["--warmup_epochs", "-1"]])
def test_benchmark_refuses_counts_below_their_minimum(args, capsys):
    import benchmark
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(args)
    assert e.value.code == 2 and f"{args[0]} must be >=" in capsys.readouterr().err
