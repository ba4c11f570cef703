"""Speed benchmark: seconds per training epoch and per validation pass, images/s and peak memory,
for each quantizer x codebook size, timed after warm-up epochs, with the library's own
train_epoch / validate (the path `train.py` runs).

    # GPU, the real CIFAR-10 in ImageFolder layout (50,000 train / 10,000 test):
    python benchmark.py --dataset folder --data_dir data/cifar10-jpg --out benchmark_gpu.json
    # CPU smoke run (laptops, CI):
    python benchmark.py --device cpu --dataset fake --train_images 512 --val_images 128 \\
        --hidden_dim 32 --latent_dim 32 --codebook_sizes 64 256 --batch_size 64 --out benchmark_cpu.json

Any other Config field can be set with --set KEY=VALUE (e.g. --set amp=off --set ba_impl=autograd).
--repeats N measures each row N times and reports the median; the "x first" column is each row's training
time over the first quantizer's at the same K (e.g. BA-VQ / VQ-EMA with --quantizers vq_ema ba_vq).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch
import yaml

import vqvae


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    # a flag that sets a Config field has the field's name (several values: the same name, as in train.py's
    # grids); the older spellings (--quantizers, --codebook_sizes, --train_images, --val_images) still work
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dataset", default="folder", choices=list(vqvae.DATASETS))
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--quantizer", "--quantizers", dest="quantizers", nargs="+", default=["vq_ema", "ba_vq"],
                   choices=list(vqvae.QUANTIZERS))
    p.add_argument("--codebook_size", "--codebook_sizes", dest="codebook_sizes", nargs="+", type=int,
                   default=[512, 2048, 8192])
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--train_subset", "--train_images", dest="train_images", type=int, default=50000,
                   help="images per training epoch (0 = all)")
    p.add_argument("--val_subset", "--val_images", dest="val_images", type=int, default=10000,
                   help="images per validation pass (0 = all)")
    p.add_argument("--hidden_dim", type=int, default=128)
    p.add_argument("--latent_dim", type=int, default=256)
    p.add_argument("--warmup_epochs", type=int, default=1, help="untimed epochs first (compilation, autotuning)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs (the mean is reported)")
    p.add_argument("--repeats", type=int, default=1,
                   help="times each quantizer x K is measured afresh (new model; the rounds interleave), "
                        "reported as the median with every repeat's time and the spread")
    p.add_argument("--count_syncs", action="store_true",
                   help="CUDA: after timing, run one more epoch and pass under torch.cuda.set_sync_debug_mode "
                        "and count the host synchronisations (expected: about steps/progress_every + a fixed few)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS training steps with torch.profiler and write the operator "
                        "table (sorted by device time) next to --out as <out>.<quantizer>_k<K>.profile.txt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other Config field, YAML-typed (repeatable)")
    p.add_argument("--out", default="benchmark.json", help="JSON file for the results")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for name, flag, least in (("epochs", "epochs", 1), ("repeats", "repeats", 1), ("batch_size", "batch_size", 1),
                              ("train_images", "train_subset", 0), ("val_images", "val_subset", 0),
                              ("warmup_epochs", "warmup_epochs", 0), ("profile", "profile", 0)):
        if getattr(args, name) < least:
            p.error(f"--{flag} must be >= {least} (got {getattr(args, name)})")
    return args


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's peak resident set size so far (Linux reports KiB, macOS bytes): a running maximum
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def bench_one(base: dict, quantizer: str, K: int, train_u8, val_u8, args) -> dict:
    cfg = vqvae.make_config({**base, "quantizer": quantizer, "codebook_size": K},
                            source="benchmark options").validate()
    device = vqvae.pick_device(cfg.device)
    rt = vqvae.make_runtime(cfg, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tr = train_u8.to(device) if cfg.data_path == "device" else train_u8
    va = val_u8.to(device)
    model, opt = vqvae.setup_model(cfg, device, rt)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = -(-tr.shape[0] // cfg.batch_size)
    total = (args.warmup_epochs + args.epochs) * steps
    val_bs = vqvae.default_val_batch_size(cfg)
    step = 0
    for _ in range(args.warmup_epochs):
        _, step = vqvae.train_epoch(model, opt, tr, cfg, g, step, total, rt=rt)
        vqvae.validate(model, va, val_bs, rt=rt)
    t_train = t_val = 0.0
    for _ in range(args.epochs):
        _sync(device)
        t0 = time.perf_counter()
        m, step = vqvae.train_epoch(model, opt, tr, cfg, g, step, total, rt=rt)
        _sync(device)
        t1 = time.perf_counter()
        v = vqvae.validate(model, va, val_bs, rt=rt)
        _sync(device)
        t2 = time.perf_counter()
        t_train += t1 - t0
        t_val += t2 - t1
    t_train /= args.epochs
    t_val /= args.epochs
    syncs = {}
    if args.count_syncs and device.type == "cuda":        # untimed: the warnings themselves cost host time
        syncs = {"host_syncs_train_epoch": count_syncs(lambda: vqvae.train_epoch(model, opt, tr, cfg, g, step,
                                                                                    total + steps, rt=rt)),
                 "host_syncs_val_pass": count_syncs(lambda: vqvae.validate(model, va, val_bs, rt=rt)),
                 "train_steps": steps, "progress_every": cfg.progress_every}
    if args.profile:
        _profile(model, opt, tr[:args.profile * cfg.batch_size], cfg, g, step, total, rt, device,
                 f"{args.out}.{quantizer}_k{K}.profile.txt")
    return {"quantizer": quantizer, "K": K, "batch_size": cfg.batch_size, "train_images": int(tr.shape[0]),
            "val_images": int(va.shape[0]), "train_s_per_epoch": t_train, "val_s_per_pass": t_val,
            "epoch_plus_val_s": t_train + t_val, "train_images_per_s": tr.shape[0] / t_train,
            "val_images_per_s": va.shape[0] / t_val, "peak_memory_mb": _peak_memory_mb(device),
            "final_train_loss": m["loss"], "val_psnr": v["psnr"],
            "amp": str(rt.amp_dtype).replace("torch.", "") if rt.amp_dtype else "off", "compile": cfg.compile,
            "compile_mode": cfg.compile_mode, "ba_impl": cfg.ba_impl, "data_path": cfg.data_path, **syncs}


def _profile(model, opt, images, cfg, g, step, total, rt, device, path) -> None:
    """torch.profiler over one short training epoch: operator table sorted by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        vqvae.train_epoch(model, opt, images, cfg, g, step, total, rt=rt)
        _sync(device)
    wall = time.perf_counter() - t0
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    steps = -(-images.shape[0] // cfg.batch_size)
    with open(path, "w") as f:
        f.write(f"{steps} steps, {wall:.3f} s wall under the profiler\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=40))
    print(f"[bench] profile written to {path}", flush=True)


def count_syncs(fn) -> int:
    """Host synchronisations made while ``fn`` runs, as reported by torch.cuda.set_sync_debug_mode('warn').
    Blocking host-to-device copies count too (train_epoch's per-epoch ``randperm(...).to(device)``), and
    so would any CUDA-graph recording inside ``fn`` (the warm-up epochs should have done it)."""
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def merge_repeats(runs: list[dict]) -> dict:
    """One row from the repeats of one quantizer x K: the median train and val times (images/s from
    them), every repeat's train time, its spread (max / min - 1) and the largest peak memory."""
    r = dict(runs[0])
    train = [x["train_s_per_epoch"] for x in runs]
    r["train_s_per_epoch"] = statistics.median(train)
    r["val_s_per_pass"] = statistics.median([x["val_s_per_pass"] for x in runs])
    r["epoch_plus_val_s"] = r["train_s_per_epoch"] + r["val_s_per_pass"]
    r["train_images_per_s"] = r["train_images"] / r["train_s_per_epoch"]
    r["val_images_per_s"] = r["val_images"] / r["val_s_per_pass"]
    r["peak_memory_mb"] = max(x["peak_memory_mb"] for x in runs)
    r["repeats"] = len(runs)
    r["train_s_per_epoch_repeats"] = train
    r["train_spread"] = max(train) / min(train) - 1.0
    return r


def add_ratios(rows: list[dict]) -> None:
    """train_ratio: each row's median train time over the first quantizer's at the same K."""
    first = {}
    for r in rows:
        first.setdefault(r["K"], r)
    for r in rows:
        r["train_ratio"] = r["train_s_per_epoch"] / first[r["K"]]["train_s_per_epoch"]
        r["ratio_to"] = first[r["K"]]["quantizer"]


def table(rows, device_name, device_type) -> str:
    mem = "peak GPU MB" if device_type == "cuda" else "peak RSS MB"
    head = (f"{'quantizer':<9} {'K':>5} {'train s/epoch':>13} {'val s/pass':>10} {'epoch+val s':>11} "
            f"{'train img/s':>11} {'val img/s':>10} {mem:>12} {'x first':>7} {'spread':>6}")
    lines = [f"device: {device_name}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['quantizer']:<9} {r['K']:>5} {r['train_s_per_epoch']:>13.3f} {r['val_s_per_pass']:>10.3f} "
                     f"{r['epoch_plus_val_s']:>11.3f} {r['train_images_per_s']:>11.0f} {r['val_images_per_s']:>10.0f} "
                     f"{r['peak_memory_mb']:>12.0f} {r['train_ratio']:>7.2f} {100 * r['train_spread']:>5.0f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        extra = {}
        for item in args.set:
            if "=" not in item:
                raise vqvae.BavqError(f"--set expects KEY=VALUE, got '{item}'.")
            k, v = item.split("=", 1)
            extra[k] = yaml.safe_load(v)
        base = {"device": args.device, "dataset": args.dataset, "data_dir": args.data_dir,
                "batch_size": args.batch_size, "hidden_dim": args.hidden_dim, "latent_dim": args.latent_dim,
                "train_subset": args.train_images, "val_subset": args.val_images, "progress": False,
                "wandb": False, **extra}
        data_cfg = vqvae.make_config(base, source="benchmark options").validate()
        train_u8, val_u8 = vqvae.load_dataset(data_cfg)
        device = vqvae.pick_device(args.device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        if args.count_syncs and device.type != "cuda":
            print("[bench] --count_syncs needs CUDA (torch.cuda.set_sync_debug_mode); on the CPU the test "
                  "suite's host-read audit covers it (tests/test_speed_paths.py)", flush=True)
        runs, skipped = {}, set()
        for rep in range(args.repeats):                     # rounds interleave: drift spreads over all rows
            for q in args.quantizers:
                for K in args.codebook_sizes:
                    if (q, K) in skipped:
                        continue
                    try:
                        r = bench_one(base, q, K, train_u8, val_u8, args)
                    except vqvae.BavqError as e:          # e.g. fsq with a K its levels do not give
                        print(f"[bench] {q} K={K} skipped: {e}", flush=True)
                        skipped.add((q, K))
                        continue
                    runs.setdefault((q, K), []).append(r)
                    print(f"[bench] {q} K={K}{f' (repeat {rep + 1}/{args.repeats})' if args.repeats > 1 else ''}: "
                          f"train {r['train_s_per_epoch']:.3f} s/epoch, val {r['val_s_per_pass']:.3f} s, "
                          f"peak {r['peak_memory_mb']:.0f} MB", flush=True)
        rows = [merge_repeats(v) for v in runs.values()]
        add_ratios(rows)
    except vqvae.BavqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(table(rows, name, device.type))
    out = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
           "command": " ".join(sys.argv), "warmup_epochs": args.warmup_epochs, "timed_epochs": args.epochs,
           "repeats": args.repeats,
           "results": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
