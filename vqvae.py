"""bavq: VQ-VAE on CIFAR-10 for studying codebook collapse.

This module is the method; read it top to bottom:

    config       the Config dataclass: every setting with its rules (allowed values, bounds, its own check)
                 and one comment each
    model        ResidualBlock, Encoder, Decoder, VQVAE
    quantizers   the Quantizer contract (with the remedies' hooks); the codebook remedies (init, restarts,
                 CVQ, affine map); VQ-EMA, ECVQ, VQ, BA-VQ (the reference Blahut-Arimoto iteration), FSQ, SimVQ,
                 OptVQ, SQ-VAE, LFQ, Wasserstein VQ, NSVQ, BSQ, DiVeQ, IBQ, residual VQ; the QUANTIZERS registry
    metrics      perplexity, usage rate, PSNR, SSIM, rate (code entropy), Frechet distance
    training     train_epoch (one step in ~25 lines), validate, model/optimizer set-up
    data         CIFAR-10 / image folder / generated images as uint8 tensors
    config checking and YAML
                 the rules across fields, make_config (types), YAML files

Beside it: vqvae_fused.py (BA-VQ's fused fast path, the same maths as the reference here),
vqvae_experiment.py (run directories, checkpoints and resume, the run lock, stop signals, torchrun, W&B,
pictures, ``train(cfg)``, ``load_run``, ``evaluate_run``), vqvae_grid.py (grids of runs, shards, summaries)
and vqvae_analysis.py (what only evaluation uses: the R(D) analysis, the papers' metric conventions, the
equal-rate frontier). The public names of the last three are reachable as ``vqvae.NAME``.

Conventions
-----------
* Images are stored as uint8 (N, 3, 32, 32) and normalised per batch to [-1, 1].
* K = ``codebook_size`` (number of codes), D = ``latent_dim`` (code dimension). Quantizer
  constructors keep the original code's names for them: ``num_embeddings`` = K, ``embedding_dim`` = D.
* Every quantizer maps latents z (B, D, H, W) to ``(z_q, loss_dict, info)`` (see ``Quantizer``).
* ``VQVAE.forward(x) -> (x_recon, recon_loss, loss_dict, info)`` as in the original code.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import random
import socket
import sys
import typing
from dataclasses import dataclass, field, fields, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vqvae_fused import BAWorkspace, ba_chunk_rows, ba_soft_quantize, compiled_ba_kernels, distance_sums, exp_normal


class BavqError(Exception):
    """A user-facing error: the message is one paragraph that says what was wrong and
    how to fix it. The CLI prints it without a traceback and exits with status 2."""


# =============================================================================
# config
# =============================================================================


def setting(default, *, choices=None, at_least=None, above=None, below=None, at_most=None, rule=None):
    """A Config field with every rule of its own value next to it: ``choices`` (a tuple, or a function giving
    one for a registry defined further down), numeric bounds at_least <= v, above < v, v < below, v <= at_most,
    and ``rule``: a function of the value giving the problem (a sentence) or None. A list ``default`` is a
    fresh copy per Config. ``field_problems`` checks one field; rules across fields are in ``config_problems``."""
    rules = {k: v for k, v in dict(choices=choices, at_least=at_least, above=above, below=below,
                                     at_most=at_most, rule=rule).items() if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class Config:
    """Every setting of a run. Defaults < YAML file (--config) < command-line flags; unknown keys and
    wrong types are errors (``make_config``), values are checked by ``validate``. Quantizer
    coefficients are passed to the quantizer's constructor by name (``VQVAE.from_config``)."""

    # --- experiment -------------------------------------------------------------------------
    name: str = setting("", rule=lambda v: _name_problem(v))  # run name; "" -> "<quantizer>_k<K>_s<seed>"
    out_dir: str = "experiments"              # runs are written to <out_dir>/<name>/
    overwrite: bool = False                   # replace an existing run of the same name (its files are deleted)
    resume: str = ""                          # run dir or checkpoint to continue (see resume_config); "" = new run
    seed: int = setting(0, at_least=0, below=2**63)  # seeds model init, codebook init and data order
    device: str = setting("auto", rule=lambda v: _device_problem(v))  # auto (MPS > CUDA > CPU) | cpu | cuda | cuda:N | mps
    # --- data -------------------------------------------------------------------------------
    dataset: str = setting("cifar10", choices=("cifar10", "folder", "fake"))  # cifar10 (torchvision download) | folder (ImageFolder) | fake
    data_dir: str = "./data"                  # cifar10: download/cache dir; folder: DIR with train/ and test/ (or val/)
    num_workers: int = setting(4, at_least=0) # processes that decode an image folder (once; then cached as .pt)
    train_subset: int = setting(0, at_least=0)  # use N evenly spaced training images (0 = all; fake: its size, 0 -> 2048)
    val_subset: int = setting(0, at_least=0)  # use N evenly spaced test images (0 = all; fake: its size, 0 -> 512)
    skip_bad_images: bool = False             # folder: leave out image files that cannot be read (default: stop, naming them)
    # --- model ------------------------------------------------------------------------------
    quantizer: str = setting("vq_ema", choices=lambda: tuple(QUANTIZERS))  # a QUANTIZERS name: vq_ema | vq | ba_vq | fsq | simvq | sq_vae | lfq | rvq | ibq | ecvq | optvq | bsq | diveq | wasserstein_vq | nsvq
    codebook_size: int = setting(512, at_least=2)  # K, number of codes
    latent_dim: int = setting(256, at_least=1)  # D, channels of the 8x8 latent grid (= code dimension)
    hidden_dim: int = setting(128, at_least=1)  # channels after the first stride-2 conv (original code: 128)
    # --- VQ-EMA (van den Oord et al. 2017, App. A.1) ----------------------------------------
    commitment_cost: float = setting(0.25, at_least=0)  # weight of mse(z, sg[z_q]) (vq_ema, ecvq, vq, ba_vq, simvq, lfq, rvq)
    decay: float = setting(0.99, at_least=0, below=1)  # EMA decay of cluster sizes and sums (vq, ba_vq: of code usage), in [0, 1)
    epsilon: float = setting(1e-5, above=0)   # Laplace smoothing of EMA cluster sizes (> 0; vq_ema, ecvq (also its Q), ba_vq --ba_codebook_update ema)
    ema_init_count: float = setting(0.0, at_least=0)  # VQ-EMA: EMA counts start at c, EMA sums at c x code (0 = the original code; see docs/method.md)
    ema_smoothing: str = setting("overwrite", choices=("overwrite", "copy"))  # VQ-EMA and BA-VQ's --ba_codebook_update ema: overwrite (original code: EMA counts := smoothed) | copy (Sonnet: smooth a copy)
    # --- FSQ (Mentzer et al. 2023) ----------------------------------------------------------
    fsq_levels: list[int] = setting([8, 8, 8], rule=lambda v: _levels_problem(v))  # levels per channel; K = their product (paper: 8 6 5 | 8 5 5 5 | 7 5 5 5 5 | 8 8 8 6 5)
    # --- SQ-VAE (Takida et al. 2022; sony/sqvae) --------------------------------------------
    sq_log_var_init: float = math.log(20.0)   # s at the start; variance sigma^2 = 1 + exp(s) (sony/sqvae: log 20 for CIFAR-10 at every D; no formula in D)
    sq_temperature_init: float = setting(1.0, above=0)  # Gumbel-softmax temperature tau_0; tau = max(tau_0 exp(-r n), tau_min) at step n
    sq_temperature_decay: float = setting(1e-5, at_least=0)  # r, per training step (sony/sqvae)
    sq_temperature_min: float = setting(0.0, at_least=0)  # tau_min (sony/sqvae)
    sq_arelbo: bool = True                    # ar-ELBO reconstruction term 0.5 log(mse) (sony/sqvae on CIFAR-10); off: mse
    # --- LFQ (Yu et al. 2023, MAGVIT-v2) ----------------------------------------------------
    lfq_entropy_cost: float = setting(0.1, at_least=0)  # weight of the entropy loss E_x[H(p)] - gamma H(E_x[p]) (nats)
    lfq_diversity_gamma: float = setting(1.0, at_least=0)  # gamma: weight of the codebook (batch) entropy inside it
    lfq_inv_temperature: float = setting(100.0, at_least=0)  # beta in p(k|x) = softmax_k(2 beta <h, c_k>)
    # --- IBQ (Shi et al. 2024, index backpropagation quantization) ----------------------------
    ibq_straight_through_cost: float = setting(1.0, at_least=0)  # weight of mse(z_q, z) through the straight-through one-hot (their first term)
    ibq_entropy_cost: float = setting(0.05, at_least=0)  # weight of the entropy loss H_sample - gamma H_codebook (their entropy_loss_weight)
    ibq_entropy_temperature: float = setting(0.01, above=0)  # T of softmax(<z, e_k> / T) in the entropy loss (their entropy_temperature)
    ibq_diversity_gamma: float = setting(1.0, at_least=0)  # gamma: weight of the codebook entropy inside it (their batch_maximization_weight)
    # --- residual VQ (Zeghidour et al. 2021, SoundStream) -----------------------------------
    rvq_stages: int = setting(8, at_least=1)  # S codebooks of K codes (VQ-EMA stages) quantize the successive residuals
    rvq_kmeans_iters: int = setting(50, at_least=0)  # k-means (random seeds, these Lloyd iterations) of each stage's input on the first training batch (encodec: 50; 0 = off, stages start from --init)
    rvq_dead_code_threshold: float = setting(2.0, at_least=0)  # every step, a stage's codes with EMA count below this are replaced by batch vectors (encodec: 2; 0 = off)
    rvq_expiry_draw: str = setting("always", choices=("always", "on_expiry"))  # when a stage draws expiry replacements: always (every stage, every step; no host sync) | on_expiry (encodec's random stream: only if one of its codes expired; one host read per step)
    rvq_codebook: str = setting("encodec", choices=("encodec", "fixed"))  # encodec (its code: k-means leaves EMA sums = centroids; a replacement is overwritten by the same step's EMA) | fixed (sums = count x centroid; a replaced code's EMA restarts from it)
    # --- ECVQ (Chou, Lookabaugh & Gray 1989) -----------------------------------------------
    ecvq_lambda: float = setting(0.1, at_least=0)  # lam in argmin_k d(z, e_k) + lam (-ln Q(k)), nats: sets the rate (0 = vq_ema exactly)
    # --- Wasserstein VQ (arXiv 2506.15078; the authors' VQ-VAE scripts) ----------------------
    wvq_gamma: float = setting(0.5, at_least=0)  # weight of W2 between Gaussians fitted to the queue and to the codebook (their scripts: 0.5; their config.py's 0 turns it off)
    wvq_queue: int = setting(65536, at_least=2)  # FIFO of recent encoder outputs the W2 term fits (theirs: 65536)
    wvq_codebook_lr: float = setting(0.02, at_least=0)  # lr of the codebook's own optimizer group, no weight decay (theirs: Adam 0.02, unscheduled; 0 = --lr)
    # --- NSVQ, "Beyond Stationarity" (arXiv 2602.18896; the paper's CelebA-HQ setup) ----------
    nsvq_weight: float = setting(0.01, at_least=0)  # w: a code other than the winner gets codebook-loss weight min(1, w K softmax_k(-d / tau)) (theirs: 0.01)
    nsvq_tau: float = setting(1.0, above=0)  # tau in the first epoch (the paper's kernel bandwidth 2 sigma^2; theirs: 1)
    nsvq_tau_decay: float = setting(0.5, above=0, at_most=1)  # tau is multiplied by this every epoch, down to 1e-8 (theirs: 0.5)
    nsvq_code_gradient: float = setting(1.0, at_least=0)  # alpha of their straight-through line: the chosen codes also get 2 alpha / (N D) x the decoder's gradient (theirs: 1; 0 = the plain one)
    # --- BSQ (Zhao et al. 2024; the authors' image-tokenizer configs) -------------------------
    bsq_group_size: int = setting(0, at_least=0)  # bits per group of the entropy terms (softmax over 2^g codes per group; must divide log2 K); 0 = all log2 K bits in one group (the exact entropies; theirs, 9, at K = 512)
    bsq_inv_temperature: float = setting(1.0, above=0)  # tau in p = softmax(2 tau <u_g, c> / sqrt(bits)); the penalty is divided by tau (theirs: 1)
    bsq_entropy_cost: float = setting(0.1, at_least=0)  # weight of the entropy penalty H_sample - gamma H_codebook after the ramp (theirs: 0.1)
    bsq_entropy_cost_start: float = setting(0.3, at_least=0)  # its weight at the first quantized step, linear to bsq_entropy_cost (theirs: 0.3)
    bsq_entropy_rampup_steps: int = setting(2000, at_least=0)  # quantized steps of that ramp (theirs: 2000; 0 = none)
    bsq_diversity_gamma: float = setting(1.0, at_least=0)  # gamma: weight of the codebook entropy inside the penalty (theirs: 1)
    # --- DiVeQ (Vali et al. 2026; the authors' class defaults, which their scripts use) --------
    diveq_sigma: float = setting(1e-3, at_least=0)  # std of the Gaussian noise added to the error direction c - z (their noise_var, a std)
    diveq_replace_every: int = setting(100, at_least=0)  # training forwards between replacements of unused codes (theirs: 100; 0 = never)
    diveq_discard_threshold: float = setting(0.01, at_least=0)  # a code is unused if (forwards that used it) / replace_every < this (theirs: 0.01)
    diveq_perturbation: float = setting(1e-9, at_least=0)  # std of the noise on a replacing copy of a used code (theirs: 1e-9)
    # --- OptVQ (Zhang et al. 2024; the authors' CIFAR-10 config) ----------------------------
    optvq_heads: int = setting(4, at_least=1)  # split each latent into this many sub-vectors (heads), each coded from one shared codebook of K codes (their CIFAR-10 config: 4)
    optvq_epsilon: float = setting(10.0, above=0)  # eps in the Sinkhorn kernel exp(-eps C~), C~ the normalised distance matrix (theirs: 10)
    optvq_iterations: int = setting(5, at_least=1)  # Sinkhorn iterations (theirs: 5)
    optvq_eval: str = setting("sinkhorn", choices=("sinkhorn", "nearest"))  # evaluation codes: sinkhorn (the authors': over the eval batch, batch-dependent) | nearest (each latent on its own)
    # --- BA-VQ (Blahut 1972, Arimoto 1972) --------------------------------------------------
    beta_start: float = setting(0.1, above=0) # inverse temperature at the first training step
    beta_end: float = 5.0                     # inverse temperature at the last step (cosine schedule, per step)
    ba_iterations: int = setting(5, at_least=1)  # Blahut-Arimoto alternations per forward pass (>= 1)
    entropy_cost: float = setting(0.01, at_least=0)  # weight of -H(Q), Q = marginal code distribution (nats)
    codebook_cost: float = setting(1.0, at_least=0)  # weight of mse(sg[z], code) (vq, simvq: hard code; ba_vq: P.E, where 1.0 is a fix, 0 = the original code)
    ba_prior: str = setting("batch", choices=("batch", "ema"))  # BA iterations start from: batch (uniform Q, original code) | ema (the running marginal Q-bar)
    marginal_decay: float = setting(0.99, at_least=0, below=1)  # BA-VQ: EMA decay of the running marginal Q-bar (evaluation codes; --ba_prior ema) and of the running mean distance, in [0, 1)
    ba_temperature: str = setting("absolute", choices=("absolute", "relative"))  # beta multiplies: absolute d(x,k) (original code) | relative d / d-bar, d-bar the batch's mean distance (scale-free)
    ba_decoder_input: str = setting("soft", choices=("soft", "hard", "anneal"))  # training decoder input: soft P.E (original code) | hard (argmax-P code) | anneal ((1-lam) P.E + lam hard, lam 0 -> 1 like beta)
    ba_codebook_loss: str = setting("mixture", choices=("mixture", "expected"))  # codebook term: mixture mse(sg[z], P.E) | expected sum_k P(k|x) |sg[z] - e_k|^2 / D (BA's centroid step)
    ba_codebook_update: str = setting("gradient", choices=("gradient", "ema", "ema_hard"))  # codebook learned by: gradient (original code) | ema (soft VQ-EMA: EMA of soft counts and sums, decay, epsilon) | ema_hard (VQ-EMA's update of the argmax codes)
    ba_assignment: str = setting("soft", choices=("soft", "hard"))  # BA's P(k|x): soft (softmax, the original code) | hard (one-hot argmax_k log Q(k) - beta d, ECVQ's rule at lam = 1/beta; Q the hard histogram)
    ba_impl: str = setting("fused", choices=("fused", "autograd"))  # fused (one pass, exact hand-written backward, row chunks) | autograd (reference)
    ba_chunk_rows: int = setting(0, at_least=0)  # fused BA: rows per chunk of the (N, K) matrices (0 = auto: ~16M elements on a GPU, ~4M elsewhere)
    # --- collapse remedies (off by default; codebook quantizers vq_ema, vq, ba_vq) ---------
    init: str = setting("uniform", choices=("uniform", "normal", "unit_sphere", "kmeans", "data"))  # codebook init: uniform U[-1/K,1/K] (original code) | normal N(0,1) | kmeans
    kmeans_batches: int = setting(4, at_least=1)  # --init kmeans: training batches of encoder outputs to cluster
    kmeans_iters: int = setting(10, at_least=0)  # --init kmeans: Lloyd iterations after k-means++ seeding
    dead_code_threshold: float = setting(0.0, at_least=0)  # restart codes whose EMA usage (assignments/step) < this; 0 = off
    dead_code_every: int = setting(100, at_least=1)  # steps between dead-code checks
    cosine: bool = False                      # L2-normalise latents and codes (cosine distance)
    gradient_estimator: str = setting("ste", choices=lambda: tuple(GRADIENT_ESTIMATORS))  # ste (straight-through) | rotation (Fifty et al. 2024)
    vq_loss_warmup_epochs: float = setting(0.0, at_least=0)  # quantizer-loss weight ramps linearly 0 -> 1 over this many epochs
    pretrain_epochs: int = setting(0, at_least=0)  # two-stage training: E epochs with the quantizer bypassed, then --init kmeans|data
    cvq: bool = False                         # CVQ-VAE online clustered codebook (vq, ba_vq): every step, under-used codes move to batch anchors
    cvq_anchor: str = setting("closest", choices=("closest", "random", "probrandom"))  # CVQ anchor per code: closest (most similar latent) | random | probrandom (softmax-sampled)
    cvq_decay: float = setting(0.99, at_least=0, below=1)  # CVQ: EMA decay of each code's share of the assignments, in [0, 1)
    cvq_gain: float = setting(10.0, at_least=0)  # CVQ: a_k = exp(-p_k K gain / (1 - cvq_decay) - cvq_offset) (CVQ-VAE: 10)
    cvq_offset: float = setting(1e-3, at_least=0)  # CVQ: the offset in a_k (CVQ-VAE: 1e-3; keeps a_k < 1)
    cvq_distance: str = setting("cos", choices=("cos", "l2"))  # CVQ: the code lookup and anchor similarity: cos (CVQ-VAE's default: cosine of normalised latent and code; codes, decoder input and losses stay raw) | l2
    affine_reparam: str = setting("off", choices=("off", "ema", "learned"))  # codes = scale * code + shift (Huh et al. 2023; vq, ba_vq): off | ema (latent statistics) | learned
    affine_momentum: float = setting(0.1, above=0, at_most=1)  # --affine_reparam ema: momentum of the running statistics, in (0, 1]
    affine_lr: float = setting(1.0, at_least=0)  # --affine_reparam learned: scale = 1 + lr s, shift = lr b (vqtorch's affine_lr)
    sync_nu: float = setting(0.0, at_least=0) # synchronized update (vq; Huh et al. 2023): the code also gets nu x the decoder's gradient (0 = off)
    alternate_lr: float = setting(0.0, at_least=0)  # alternating optimisation (vq): SGD step of this lr on the codebook loss before each step (0 = off)
    alternate_momentum: float = setting(0.9, at_least=0)  # --alternate_lr: SGD momentum of that inner step
    alternate_commitment: bool = False        # --alternate_lr: keep the commitment term (our variant; vqtorch's in-place mode has none, beta = 1)
    grad_clip: float = setting(0.0, at_least=0)  # clip the global gradient norm to this (0 = off)
    model_ema: float = setting(0.0, at_least=0, below=1)  # decay of an EMA of the model's weights (IBQ's authors' LitEma: 0.999; 0 = off): validation and the final model use the averaged weights
    model_ema_warmup: bool = False  # --model_ema's decay as min(decay, (1 + n) / (10 + n)) at update n (LitEma's use_num_upates; IBQ's authors: off)
    explode_factor: float = setting(100.0, at_least=0, rule=lambda v: _explode_problem(v))  # stop when a step's recon_loss exceeds this x its minimum over the previous explode_window steps (0 = off)
    explode_window: int = setting(1000, at_least=1)  # steps in that window (the check runs every min(progress_every, this) steps)
    # --- optimisation -----------------------------------------------------------------------
    epochs: int = setting(100, at_least=1)    # passes over the training set
    batch_size: int = setting(256, at_least=1)  # training batch size (images)
    val_batch_size: int = setting(0, at_least=0)  # validation batch size; 0 = auto: batch_size if codes depend on the batch (ba_vq), else 1024
    lr: float = setting(3e-4, above=0)        # AdamW learning rate
    weight_decay: float = setting(0.01, at_least=0)  # AdamW weight decay (PyTorch's default)
    # --- speed (how the loop runs, not what it computes) ------------------------------------
    amp: str = setting("auto", choices=("auto", "bf16", "fp16", "off"))  # mixed precision: auto (bf16 on CUDA, off elsewhere) | bf16 | fp16 (CUDA) | off
    channels_last: bool = True                # NHWC memory format for the convolutions (CUDA only)
    compile: bool = False                     # torch.compile the encoder and decoder (opt-in; the first epoch compiles)
    compile_mode: str = setting("default", choices=("default", "reduce-overhead", "max-autotune"))  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    data_path: str = setting("device", choices=("device", "loader"))  # device: uint8 tensors on the device, batched by index | loader: DataLoader (plain)
    # --- logging and outputs ----------------------------------------------------------------
    wandb: bool = True                        # log to Weights & Biases (offline without API key/network)
    wandb_project: str = "vq-codebook"        # W&B project name
    wandb_group: str = ""                     # W&B group (a grid's runs: its name, set by the grid); "" = none
    checkpoint_every: int = setting(10, at_least=0)  # write checkpoint_epoch{N}.pt (+ recon.png, usage.png) every N epochs (0 = never)
    keep_checkpoints: int = setting(0, at_least=0)  # keep only the N latest checkpoint_epoch{N}.pt (0 = keep all)
    eval_metrics: list[str] = setting(["psnr", "ssim"], rule=lambda v: _metrics_problem(v))  # final metrics: psnr ssim (always) lpips fid (requirements-eval.txt) perplexity_sqvae psnr_cvqvae ssim_cvqvae (papers' conventions, docs/metrics.md)
    eval_every: int = setting(0, at_least=0)  # also compute lpips/fid every N epochs (0 = only at the end of the run)
    recon_images: int = setting(8, at_least=1)  # validation images shown in recon.png
    progress: bool = True                     # show tqdm progress bars
    progress_every: int = setting(25, at_least=1)  # steps between progress-bar refreshes (each one syncs the device)


    def resolved_name(self) -> str:
        return self.name or f"{self.quantizer}_k{self.codebook_size}_s{self.seed}"

    def validate(self, fix: str = "Fix these values in your YAML file or on the command line (python train.py "
                                  "--help lists every option).") -> "Config":
        """Check every value (types are checked when the config is built); see ``config_problems``.
        Raises BavqError listing all problems and ``fix``; returns self."""
        problems = config_problems(self)
        if problems:
            raise BavqError("Invalid configuration: " + "; ".join(problems) + ". " + fix)
        return self


def declared_choices(name: str) -> tuple:
    """The ``choices`` a Config field declares (a fixed tuple; registries go through ``field_choices``)."""
    return Config.__dataclass_fields__[name].metadata["choices"]


# =============================================================================
# model
# =============================================================================


class ResidualBlock(nn.Module):
    """x -> ReLU(x + conv(ReLU(conv(x)))), 3x3 convs, same channels and size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class Encoder(nn.Module):
    """(B, 3, 32, 32) -> (B, D, 8, 8): two stride-2 4x4 convs, a 3x3 conv, two residual blocks."""
    downsample = 4                      # each latent position covers 4 x 4 pixels

    def __init__(self, in_channels: int = 3, hidden_dim: int = 128, latent_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 4, stride=2, padding=1), nn.ReLU(),   # (B, 128, 16, 16)
            nn.Conv2d(hidden_dim, latent_dim, 4, stride=2, padding=1), nn.ReLU(),    # (B, 256, 8, 8)
            nn.Conv2d(latent_dim, latent_dim, 3, padding=1), nn.ReLU(),
            ResidualBlock(latent_dim),
            ResidualBlock(latent_dim),
        )

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, D, 8, 8) -> (B, 3, 32, 32): mirror of the encoder, no output activation."""

    def __init__(self, out_channels: int = 3, hidden_dim: int = 128, latent_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            ResidualBlock(latent_dim),
            ResidualBlock(latent_dim),
            nn.Conv2d(latent_dim, latent_dim, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(latent_dim, hidden_dim, 4, stride=2, padding=1), nn.ReLU(),   # (B, 128, 16, 16)
            nn.ConvTranspose2d(hidden_dim, out_channels, 4, stride=2, padding=1),            # (B, 3, 32, 32)
        )

    def forward(self, z):
        return self.net(z)


class VQVAE(nn.Module):
    """Encoder -> quantizer -> decoder.

    ``forward(x)`` returns ``(x_recon, recon_loss, loss_dict, info)``: the reconstruction, its MSE
    against ``x`` (on the [-1, 1] scale), the quantizer's weighted loss terms (total loss =
    recon_loss + sum(loss_dict.values())) and the quantizer's info dict (``code_indices``,
    ``code_counts``, ``perplexity``, ``usage_rate``, ...). In eval mode every quantizer
    reconstructs from hard codes.
    """

    def __init__(self, quantizer_type: str = "vq_ema", codebook_size: int = 512, latent_dim: int = 256,
                 hidden_dim: int = 128, in_channels: int = 3, **quantizer_kwargs):
        super().__init__()
        known = Config.__dataclass_fields__                  # every rule of these settings, as for a run
        Config(quantizer=quantizer_type, codebook_size=codebook_size, latent_dim=latent_dim, hidden_dim=hidden_dim,
               **{k: v for k, v in quantizer_kwargs.items() if k in known}).validate(
            "Fix these arguments of VQVAE(...) (their rules: the Config fields of the same names).")
        self.encoder = Encoder(in_channels, hidden_dim, latent_dim)
        self.quantizer = QUANTIZERS[quantizer_type](codebook_size, latent_dim, **quantizer_kwargs)
        self.quantizer.image_values_per_position = in_channels * Encoder.downsample ** 2
        self.decoder = Decoder(in_channels, hidden_dim, latent_dim)
        self.compiled = False                  # set by setup_model when encoder/decoder are torch.compile'd
        self.bypass_quantizer = False          # two-stage training, stage 1: the decoder gets z itself
        self.batch_split = None                # one run over several processes (vqvae_experiment.DataParallel):
                                               # its mine(x) / gather(block, n), used by forward

    def mark_step(self) -> None:
        """Before each training step or evaluation batch of a compiled model: tells CUDA graphs
        (--compile_mode reduce-overhead) that the previous step's outputs are no longer needed."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()

    @classmethod
    def from_config(cls, cfg: Config) -> "VQVAE":
        qcls = QUANTIZERS[cfg.quantizer]
        params = inspect.signature(qcls.__init__).parameters
        kwargs = {k: getattr(cfg, k) for k in params if k not in ("self", "num_embeddings", "embedding_dim")}
        return cls(cfg.quantizer, cfg.codebook_size, cfg.latent_dim, cfg.hidden_dim, **kwargs)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [-1, 1] -> code indices (B, 8, 8) (residual VQ: (B, S, 8, 8)), as in
        evaluation (no state changes)."""
        with evaluating(self):
            return self.quantizer(self.encoder(x))[2]["code_indices"]

    @torch.no_grad()
    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (as ``encode`` gives them) -> images (B, 3, 32, 32) on the [-1, 1] scale (not clipped)."""
        return self.decoder(self.quantizer.decode_indices(indices))

    @torch.no_grad()
    def _bypassed(self, z):
        """Stage 1 of two-stage training: z goes to the decoder unquantized; the quantizer runs in
        eval mode without gradients (no state changes) so its codes and loss terms can still be logged."""
        was_training = self.quantizer.training
        self.quantizer.eval()
        _, loss_dict, info = self.quantizer(z)
        self.quantizer.train(was_training)
        return z, loss_dict, info

    def forward(self, x):
        split, n = self.batch_split, x.shape[0]
        if split is None:
            z = self.encoder(x)                               # (B, D, 8, 8)
        else:                                                 # several processes: each encodes its block of the
            z = split.gather(self.encoder(split.mine(x)), n)  # batch; the latents of all B images, on every one
        if self.bypass_quantizer:                             # the quantizer only reports what it would do
            z_q, loss_dict, info = self._bypassed(z)
        else:
            z_q, loss_dict, info = self.quantizer(z)          # (B, D, 8, 8): the whole batch, on every process
        if split is None:
            x_recon = self.decoder(z_q)                       # (B, 3, 32, 32)
        else:                                                 # each decodes its block; all B reconstructions
            x_recon = split.gather(self.decoder(split.mine(z_q)), n)
        recon_loss = F.mse_loss(at_least_f32(x_recon), at_least_f32(x))
        return x_recon, recon_loss, loss_dict, info



# =============================================================================
# quantizers
# =============================================================================


def at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 -> float32; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _flatten_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B*H*W, D), at least float32 (distances are never computed in half precision)."""
    B, D, H, W = z.shape
    return at_least_f32(z.permute(0, 2, 3, 1).reshape(B * H * W, D))


def _unflatten_latents(z_flat: torch.Tensor, shape) -> torch.Tensor:
    """(B*H*W, D) -> (B, D, H, W)."""
    B, D, H, W = shape
    return z_flat.reshape(B, H, W, D).permute(0, 3, 1, 2)


def squared_distances(z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """d(x, k) = ||z_x||^2 + ||e_k||^2 - 2 <z_x, e_k>, (N, D) x (K, D) -> (N, K), clamped at 0
    (the expansion can go slightly negative in floating point)."""
    d = (z_flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None, :]
         - 2.0 * z_flat @ codebook.t())
    return d.clamp_min_(0.0)


def code_histogram(indices: torch.Tensor, K: int) -> torch.Tensor:
    """Counts of each of the K codes, (K,) long. index_add_, not bincount: CUDA's bincount reads
    min/max back to the host, a sync on every step."""
    flat = indices.reshape(-1)
    return torch.zeros(K, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def _code_stats(indices: torch.Tensor, K: int) -> dict:
    counts = code_histogram(indices, K)
    return {"code_counts": counts, "perplexity": perplexity_from_counts(counts),
            "usage_rate": usage_from_counts(counts)}


_AUTOCAST_OK: dict = {}


def _autocast_available(device_type: str) -> bool:
    """torch.autocast('mps') raises before torch 2.5 even when disabled."""
    if device_type not in _AUTOCAST_OK:
        try:
            torch.autocast(device_type=device_type, enabled=False)
            _AUTOCAST_OK[device_type] = True
        except RuntimeError:
            _AUTOCAST_OK[device_type] = False
    return _AUTOCAST_OK[device_type]


def _autocast_off(device_type: str):
    if not _autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """z + sg[q - z]: the forward pass gives q, the backward pass copies the gradient to z
    unchanged (quantization has no useful derivative). Applied whatever z.requires_grad says."""
    return z + (q - z).detach()


def rotation_trick(z: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
    Trick", eq. 4): q~ = sg[lambda R] z with lambda = ||q|| / ||z|| and the rotation
    R = I - 2 w w^T + 2 v u^T, u = z/||z||, v = q/||q||, w = (u + v)/||u + v||, which maps u to v.
    Forward: q~ = q (up to rounding). Backward: the gradient reaching z is lambda R^T g, so the
    angle and norm of z relative to its code shape the encoder's update. Rows (N, D); eps guards
    zero norms (eps is numerical, not a model coefficient); rows with ||z|| <= eps use the
    straight-through copy instead."""
    with torch.no_grad():
        z_norm = z.norm(dim=1, keepdim=True).clamp_min(eps)
        q_norm = q.norm(dim=1, keepdim=True).clamp_min(eps)
        u, v = z / z_norm, q / q_norm
        w = u + v
        w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
        lam = q_norm / z_norm
    # R z = z - 2 w (w.z) + 2 v (u.z), computed without materialising the (D, D) matrix
    rz = z - 2.0 * w * (w * z).sum(1, keepdim=True) + 2.0 * v * (u * z).sum(1, keepdim=True)
    # a zero latent has no direction to rotate from: fall back to the straight-through copy there
    degenerate = z.norm(dim=1, keepdim=True).detach() <= eps
    return torch.where(degenerate, straight_through(z, q), lam * rz)


GRADIENT_ESTIMATORS = {"ste": straight_through, "rotation": rotation_trick}

# The library's codebook remedies, and when a config turns each on (config checks name the ones a quantizer
# cannot honour). Every remedy reaches a quantizer by one of two paths, both named in the Quantizer contract:
#   * inside its forward, from its constructor coefficients (cosine, gradient_estimator, cvq, affine_reparam,
#     sync_nu, alternate_lr: CodebookQuantizer and its subclasses);
#   * from train_epoch, the only caller of the two hooks that ``Quantizer`` declares (no-ops by default):
#     ``init_from_latents`` via init_from_data just before the first quantized step (--init kmeans|data) and
#     ``restart_dead_codes`` every dead_code_every steps (--dead_code_threshold); residual VQ passes both on to
#     each stage. The codebook init itself (--init uniform|normal|unit_sphere) is init_codebook, in the
#     constructor.
# A quantizer's own published mechanisms are part of its algorithm, not library remedies, and stay in its
# forward: residual VQ's encodec k-means on the first batch and its per-step expiry (rvq_kmeans_iters,
# rvq_dead_code_threshold) run between one stage's assignment and its EMA update, which no hook between
# steps can reproduce.
REMEDY_ON = {"init": lambda c: c.init != "uniform", "dead_code_threshold": lambda c: c.dead_code_threshold > 0,
             "cosine": lambda c: c.cosine, "gradient_estimator": lambda c: c.gradient_estimator != "ste",
             "cvq": lambda c: c.cvq, "affine_reparam": lambda c: c.affine_reparam != "off",
             "sync_nu": lambda c: c.sync_nu != 0, "alternate_lr": lambda c: c.alternate_lr > 0}
GRADIENT_CODEBOOK_REMEDIES = ("cvq", "affine_reparam", "sync_nu", "alternate_lr")   # need a codebook trained by gradient
DATA_INITS = ("kmeans", "data")          # computed from encoder outputs by init_from_data before quantized training


def remedies_in_use(cfg: "Config", names=tuple(REMEDY_ON)) -> list:
    """The remedies among ``names`` that ``cfg`` turns on."""
    return [n for n in names if REMEDY_ON[n](cfg)]


def cosine_schedule(start: float, end: float, t: float) -> float:
    """Cosine interpolation from ``start`` (t = 0) to ``end`` (t = 1)."""
    t = min(max(t, 0.0), 1.0)
    return start + (end - start) * (1.0 - math.cos(math.pi * t)) / 2.0


class Quantizer(nn.Module):
    """The contract every quantizer follows. Adding one = a subclass, its line in ``QUANTIZERS``,
    and Config fields named like its constructor's coefficients.

    ``__init__(num_embeddings, embedding_dim, **coefficients)``: K codes of dimension D; every other
    argument is filled from the Config field of the same name (``VQVAE.from_config``). Constructors trust
    their arguments: ``VQVAE(...)`` and ``Config.validate`` check them by the fields' rules (``setting``) and
    the quantizer's ``config_problems``, so a rule is written once.

    ``forward(z)``, z the encoder's latents (B, D, H, W), returns ``(z_q, loss_dict, info)``:
      z_q        (B, D, H, W), what the decoder sees, with the gradient path to the encoder;
      loss_dict  {name: 0-dim float32 tensor}, already weighted, keys exactly ``loss_names``; the
                 training loss is recon_loss + w * sum(loss_dict.values()) (w: loss warm-up);
      info       ``code_indices`` (B, H, W) long (S = ``codes_per_position`` > 1: (B, S, H, W)),
                 ``code_counts`` (num_embeddings,) long, the histogram of those indices, ``perplexity`` and
                 ``usage_rate`` (0-dim tensors, no host sync); optionally, in eval mode,
                 ``other_decoder_inputs`` {name: (B, D, H, W)}, more decoder inputs that validation reports as
                 ``psnr_<name>`` (BA-VQ's soft P.E: ``psnr_soft``).
    In eval mode forward changes no state (validation leaves ``state_dict()`` bit-identical).

    What the training loop, validation, logging and config checking ask of a quantizer (and nothing
    else: no code outside a quantizer tests its name or class):
    """
    loss_names: tuple = ()               # keys of loss_dict (history and final_metrics get stable columns)
    codes_per_position: int = 1          # codes that one latent position carries (residual VQ's stages, OptVQ's heads)
    batch_dependent_codes: bool = False  # a latent's code depends on the rest of its batch: validate at
                                         # the training batch size
    has_codebook: bool = False           # the codebook remedies apply (init, dead-code restarts, cosine,
                                         # gradient_estimator): config checking allows them, and the hooks
                                         # init_from_latents and restart_dead_codes below do something (see
                                         # CodebookQuantizer and the note above REMEDY_ON)
    eval_metrics: tuple = ()             # 0-dim tensors in info that validation reports (sample-weighted mean)
    train_metrics: tuple = ()            # 0-dim tensors in info that training epochs report (sample-weighted
                                         # mean over the epoch's steps), e.g. BA-VQ's regime diagnostics
    remedies_note: str = "which has no codebook"   # why the codebook remedies do not apply (has_codebook False)
    alphabet_note: str = "it has no explicit alphabet of decoder inputs"   # why rate_distortion_source is None ("": it is not)

    image_values_per_position: int = 48  # image values (channels x pixels) one latent position stands for;
                                         # set by VQVAE (3 x 4 x 4 for its 4x-downsampling encoder)
    steps_per_epoch: int = 0             # training steps in an epoch, set by train_epoch (0: not yet known)

    def set_schedule(self, t: float, step: int = 0) -> None:
        """Called before every training step with t in [0, 1], the fraction of training done, and
        ``step``, the number of training steps already taken (0 at the first step)."""

    def reconstruction_objective(self, recon_loss: torch.Tensor) -> torch.Tensor:
        """The reconstruction term of the training loss as a function of recon_loss (the MSE on the
        [-1, 1] scale): recon_loss itself, except for quantizers whose objective is an ELBO with
        another likelihood term (SQ-VAE's ar-ELBO: 0.5 log recon_loss)."""
        return recon_loss

    def histogram_metrics(self, counts: torch.Tensor, n_images: int) -> dict:
        """Metrics of the (num_embeddings,) code histogram of a training epoch or validation pass
        beyond the standard ones (e.g. residual VQ's per-stage perplexity); they override those."""
        return {}

    def code_set_metrics(self, indices: torch.Tensor) -> dict:
        """Metrics of every code index of a validation pass, (N, ...) long, concatenated over the
        batches (e.g. residual VQ's combined code); called once per validation."""
        return {}

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> the decoder input (B, D, H, W) that eval-mode forward gives for them."""
        raise NotImplementedError(f"{type(self).__name__} does not implement decode_indices")

    def extra_metrics(self) -> dict:
        """Scalars logged with every epoch's train and val metrics (e.g. BA-VQ's beta)."""
        return {}

    def rate_distortion_source(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For the rate-distortion analysis (``latent_rate_distortion``): z (B, D, H, W) -> (x (B*H*W, d), the
        vectors this quantizer's codes stand in for, in the order of ``code_indices``; alphabet (K, d), row k
        what code k reproduces x by), so that ||x - alphabet[code]||^2 is the distortion of its eval-mode
        assignment. None (the default) when it has no explicit alphabet of K decoder inputs
        (``alphabet_note`` says why); the analysis then refuses it."""
        return None

    def compile_kernels(self) -> None:
        """``--compile``: compile the quantizer's own kernels, if it has any."""

    def optimizer_groups(self) -> list:
        """Parameter groups of its own for the optimizer ({"name", "params", "lr", "weight_decay"}, e.g. Wasserstein
        VQ's codebook at its authors' lr); every other parameter takes --lr and --weight_decay. A group with a
        "name" keeps its lr on --resume."""
        return []

    # --- the codebook remedies' hooks: train_epoch calls them when the config turns the remedy on (config
    # checking refuses these remedies where ``has_codebook`` is False, so the defaults do nothing)
    def init_from_latents(self, z_flat: torch.Tensor, fit) -> None:
        """--init kmeans|data, just before the first quantized step (``init_from_data``): ``fit(x, K)`` gives
        (K codes fitted to the vectors x, their counts per training step) for the encoder outputs z_flat (N, D)."""

    def restart_dead_codes(self, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """--dead_code_threshold, every dead_code_every steps: restart the codes whose usage fell below the
        threshold; a codebook learned by gradient also clears ``optimizer``'s moments of the restarted rows
        (their history belongs to the old code). Returns the (num_embeddings,) bool mask of restarted codes."""
        return torch.zeros(self.num_embeddings, dtype=torch.bool)

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        """Problems of ``cfg`` that only this quantizer knows about (one sentence each)."""
        return []

    @classmethod
    def batch_dependent(cls, cfg: Config) -> bool:
        """Whether, under ``cfg``, a latent's evaluation code depends on the rest of its batch (validation then
        runs at the training batch size, and the frontier marks the run): ``batch_dependent_codes`` by default."""
        return cls.batch_dependent_codes

    @classmethod
    def complete_config(cls, given: dict) -> dict:
        """The settings given (defaults not yet filled in) completed by what this quantizer derives
        from them (e.g. FSQ: codebook_size from fsq_levels when only the levels are given)."""
        return given


class TableQuantizer(Quantizer):
    """A quantizer whose codes are the rows of its ``codebook`` (K, D) as they are (no reparameterisation, no
    normalisation), and whose evaluation assigns the nearest one: SQ-VAE, Wasserstein VQ, NSVQ, DiVeQ."""

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return at_least_f32(self.codebook)[indices].permute(0, 3, 1, 2)          # (B, H, W) -> (B, D, H, W)

    def rate_distortion_source(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents and the codebook (evaluation assigns the nearest code)."""
        return _flatten_latents(z), at_least_f32(self.codebook)


def init_codebook(K: int, D: int, init: str) -> torch.Tensor:
    """uniform: U[-1/K, 1/K] (the original code); normal: N(0, 1); unit_sphere: uniform directions with
    norm sqrt(D) (the norm of a N(0, I_D) vector, from the tokenizer collapse report). kmeans and data
    start from uniform and are replaced by ``init_from_data`` on encoder outputs before training."""
    if init == "normal":
        return torch.randn(K, D)
    if init == "unit_sphere":
        return F.normalize(torch.randn(K, D), dim=1) * math.sqrt(D)
    return torch.empty(K, D).uniform_(-1.0 / K, 1.0 / K)


@torch.no_grad()
def kmeans_codebook(x: torch.Tensor, K: int, iters: int, generator: torch.Generator | None = None,
                    cosine: bool = False, seeding: str = "kmeans++") -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding (Arthur & Vassilvitskii 2007; ``seeding="random"``: K rows drawn without
    replacement) then ``iters`` Lloyd iterations on the rows of x (N, D). Returns (centers (K, D),
    cluster sizes (K,)); with random seeding and 0 iterations the centres are data rows. ``cosine``: spherical k-means (rows
    and centres L2-normalised). An empty cluster is re-seeded at the data point farthest from its
    own centre (standard practice), after the seeding and after every Lloyd update, so every centre
    ends at a data point or a mean of data points with a positive size. Only when x has fewer than
    K distinct rows must some centres coincide; each such centre shares the count of the used centre
    it coincides with (the nearest one) equally, so every count is positive and they sum to N."""
    x = x.float()
    if cosine:
        x = F.normalize(x, dim=1)
    N = x.shape[0]
    dev = x.device
    if seeding == "random":
        pick = torch.randperm(N, generator=generator)[:K] if N >= K else torch.randint(0, N, (K,), generator=generator)
        return _sized_clusters(x, _lloyd(x, _reseed_empty_clusters(x, x[pick.to(dev)]), iters, cosine))
    first = torch.randint(0, N, (1,), generator=generator).to(dev)
    centers = [x[first[0]]]
    d2 = (x - centers[0]).pow(2).sum(1)                                       # (N,) distance to nearest centre
    for _ in range(1, K):
        if float(d2.sum()) <= 0:                                              # fewer distinct points than K
            nxt = torch.randint(0, N, (1,), generator=generator).to(dev)[0]
        else:                                                                 # D^2 sampling
            nxt = torch.multinomial((d2 / d2.sum()).cpu(), 1, generator=generator).to(dev)[0]
        centers.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(1))
    c = _reseed_empty_clusters(x, torch.stack(centers))                       # (K, D)
    return _sized_clusters(x, _lloyd(x, c, iters, cosine))


def _lloyd(x: torch.Tensor, c: torch.Tensor, iters: int, cosine: bool) -> torch.Tensor:
    """``iters`` Lloyd iterations from centres c (K, D), re-seeding empty clusters after each."""
    K = c.shape[0]
    for _ in range(iters):
        assign = squared_distances(x, c).argmin(1)                            # (N,)
        counts = torch.bincount(assign, minlength=K).float()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        if cosine:
            c = F.normalize(c, dim=1)
        c = _reseed_empty_clusters(x, c)
    return c


def _sized_clusters(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres, cluster sizes): the size of each centre's cluster of rows of x, every one positive
    (see kmeans_codebook)."""
    K, dev = c.shape[0], x.device
    counts = torch.bincount(squared_distances(x, c).argmin(1), minlength=K).float()
    empty = counts == 0                       # left only when x has fewer distinct rows than K
    if bool(empty.any()):                     # each joins the nearest used centre and shares its count
        used = (~empty).nonzero().flatten()
        owner = torch.arange(K, device=dev)
        owner[empty] = used[squared_distances(c[empty], c[used]).argmin(1)]
        counts = counts[owner] / torch.bincount(owner, minlength=K).float()[owner]
    return c, counts


def _reseed_empty_clusters(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Move the centre of each empty cluster onto a data point, the points farthest from their own
    centres first (one per empty cluster), until none is empty or every point sits on a centre."""
    c = c.clone()
    for _ in range(c.shape[0]):
        d = squared_distances(x, c)                                           # (N, K)
        own, assign = d.min(1)
        empty = (torch.bincount(assign, minlength=c.shape[0]) == 0).nonzero().flatten()
        far = own.argsort(descending=True)[:len(empty)]
        far = far[own[far] > 0]
        if len(empty) == 0 or len(far) == 0:
            break
        c[empty[:len(far)]] = x[far]
    return c


class CodebookQuantizer(Quantizer):
    """A quantizer with an explicit codebook (K, D) and the remedies that act on it, all off by default:

    * ``init``: codebook initialisation (``init_codebook``; kmeans is applied by ``train``).
    * ``cosine``: latents and codes are L2-normalised before distances (cosine distance); the
      decoder receives the normalised code.
    * ``gradient_estimator``: ``straight_through`` or ``rotation_trick`` for the decoder input.
    * dead-code restarts: ``usage`` is an EMA (decay ``decay``) of hard assignments per step (VQ-EMA
      uses its own EMA counts); every ``dead_code_every`` steps the trainer calls
      ``restart_dead_codes``, which replaces codes with usage < ``dead_code_threshold`` by random
      encoder outputs of the current batch and resets their usage (and EMA sums) to match.
    * ``init_from_latents`` / ``load_codes``: k-means / data initialisation (``--init kmeans|data``) fits the
      encoder's outputs and sets the codes and their usage.

    Gradient-trained codebooks (vq, ba_vq) also offer, through ``_setup_cvq`` / ``_setup_affine``:

    * CVQ-VAE's online clustered codebook (Zheng & Vedaldi 2023, ``--cvq``): an EMA of each code's share
      of the batch's assignments, p_k <- decay p_k + (1 - decay) n_k / N, and after every training
      forward e_k <- (1 - a_k) e_k + a_k f_k with a_k = exp(-p_k K gain / (1 - decay) - offset) (their
      gain 10 and offset 1e-3), f_k an anchor from this batch's latents: ``closest`` (the latent most
      similar to e_k), ``random`` (K latents drawn with replacement) or ``probrandom`` (one latent drawn
      per code with probability softmax over the batch of the similarity). Similarity: -d(x, k), or the
      cosine with ``cosine``. The step's gradient was computed with the codes before the update (as
      the authors' in-place assignment).
    * Affine reparameterisation (Huh et al. 2023, ``--affine_reparam ema|learned``): the codes used
      everywhere are c_k = scale * e_k + shift with per-dimension scale and shift (D,) shared by all
      codes; ``ema``: running statistics (momentum m, the first batch copied) of the latents' and the
      raw codes' per-dimension means and (biased) variances, scale = sqrt(var_z / (var_e + 1e-8)),
      shift = mean_z - scale mean_e; ``learned``: scale = 1 + lr s, shift = lr b with s, b learned from 0.
      Restarts and data inits write raw codes through the inverse map.
    """
    has_codebook = True
    cvq = False
    affine = "off"
    ema_codes = False                     # the forward rewrites the codebook after using it (BA-VQ's soft EMA)

    def _setup_cvq(self, cvq: bool, anchor: str, decay: float, gain: float, offset: float, distance: str = "cos") -> None:
        self.cvq, self.cvq_anchor, self.cvq_decay, self.cvq_gain, self.cvq_offset = cvq, anchor, decay, gain, offset
        self.cvq_cos = cvq and distance == "cos" and not self.cosine      # CVQ-VAE's lookup-only cosine
        if cvq:
            self.register_buffer("cvq_usage", torch.zeros(self.num_embeddings))    # p_k, share of assignments (K,)

    def _setup_affine(self, affine_reparam: str, momentum: float, lr: float) -> None:
        self.affine, self.affine_momentum, self.affine_lr = affine_reparam, momentum, lr
        D = self.embedding_dim
        if affine_reparam == "ema":                  # running statistics of the latents z and the raw codes e
            self.register_buffer("affine_z_mean", torch.zeros(D))
            self.register_buffer("affine_z_var", torch.ones(D))
            self.register_buffer("affine_e_mean", torch.zeros(D))
            self.register_buffer("affine_e_var", torch.ones(D))
            self.register_buffer("affine_started", torch.zeros((), dtype=torch.bool))
        elif affine_reparam == "learned":
            self.affine_s = nn.Parameter(torch.zeros(D))
            self.affine_b = nn.Parameter(torch.zeros(D))

    def affine_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale (D,), shift (D,)) of the affine reparameterisation."""
        if self.affine == "ema":
            scale = (self.affine_z_var / (self.affine_e_var + 1e-8)).sqrt()
            return scale, self.affine_z_mean - scale * self.affine_e_mean
        return 1.0 + self.affine_lr * at_least_f32(self.affine_s), self.affine_lr * at_least_f32(self.affine_b)

    @torch.no_grad()
    def _affine_track(self, z_flat: torch.Tensor) -> None:
        """Training forward, before the distances: update the running statistics (``ema`` only)."""
        if self.affine != "ema":
            return
        e, m = at_least_f32(self.codebook), self.affine_momentum
        new = (z_flat.mean(0), z_flat.var(0, unbiased=False), e.mean(0), e.var(0, unbiased=False))
        for buf, x in zip((self.affine_z_mean, self.affine_z_var, self.affine_e_mean, self.affine_e_var), new):
            buf.copy_(torch.where(self.affine_started, m * x + (1.0 - m) * buf, x))
        self.affine_started.fill_(True)

    def _to_raw(self, codes: torch.Tensor) -> torch.Tensor:
        """The raw codebook rows whose reparameterised codes are ``codes`` (the identity without affine)."""
        if self.affine == "off":
            return codes
        scale, shift = self.affine_params()
        tiny = torch.finfo(scale.dtype).tiny
        return (codes - shift) / torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)

    @torch.no_grad()
    def _cvq_step(self, z_flat: torch.Tensor, counts: torch.Tensor) -> None:
        """CVQ-VAE's update of every code toward an anchor, faster the less the code is used."""
        if not self.cvq:
            return
        K, z = self.num_embeddings, z_flat.detach()
        self.cvq_usage.mul_(self.cvq_decay).add_(counts.float() / z.shape[0], alpha=1.0 - self.cvq_decay)
        E = self._codes()                                                          # (K, D)
        if self.cosine:
            sim = z @ E.t()                                                        # (N, K), both normalised
        elif self.cvq_cos:                                                         # their 'cos': normalised copies
            sim = F.normalize(z, dim=1) @ F.normalize(E, dim=1).t()
        else:
            sim = -squared_distances(z, E)
        if self.cvq_anchor == "closest":
            pick = sim.argmax(0)                                                    # (K,)
        elif self.cvq_anchor == "random":
            pick = torch.randint(0, z.shape[0], (K,), device=z.device)
        else:                       # probrandom: a draw from softmax over the batch, by Gumbel-max (no host sync)
            pick = (sim.t().log_softmax(1) + gumbel_noise(sim.t())).argmax(1)
        alpha = torch.exp(-self.cvq_usage * K * self.cvq_gain / (1.0 - self.cvq_decay) - self.cvq_offset)[:, None]
        raw = at_least_f32(self.codebook)
        self.codebook.copy_((raw * (1.0 - alpha) + self._to_raw(z[pick]) * alpha).to(self.codebook.dtype))

    def _setup(self, num_embeddings, embedding_dim, init, cosine, gradient_estimator, dead_code_threshold, decay):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.init, self.cosine, self.gradient_estimator = init, cosine, gradient_estimator
        self.dead_code_threshold, self.decay = dead_code_threshold, decay
        self._estimate = GRADIENT_ESTIMATORS[gradient_estimator]
        self._last_z = None                      # this step's (normalised) latents, for restarts
        codebook = init_codebook(num_embeddings, embedding_dim, init)
        return F.normalize(codebook, dim=1) if cosine else codebook

    def _latents(self, z: torch.Tensor) -> torch.Tensor:
        z_flat = _flatten_latents(z)                                  # (N, D), N = B*H*W
        return F.normalize(z_flat, dim=1) if self.cosine else z_flat

    def _codes(self) -> torch.Tensor:
        """The codes in use (K, D): the codebook, reparameterised (affine) and normalised (cosine) when
        asked; a copy with CVQ, whose update after the forward must not change what the backward sees."""
        E = at_least_f32(self.codebook)                              # (K, D)
        if self.cvq or self.ema_codes:
            E = E.clone()                 # CVQ / the soft EMA rewrite the codebook in place after the forward
        if self.affine != "off":
            scale, shift = self.affine_params()
            E = E * scale + shift                                     # c_k = scale * e_k + shift
        return F.normalize(E, dim=1) if self.cosine else E

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self._codes()[indices].permute(0, 3, 1, 2)             # (B, H, W) -> (B, D, H, W)

    def rate_distortion_source(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents and the codes in use (normalised with --cosine, reparameterised with --affine_reparam)."""
        return self._latents(z), self._codes()

    def _track(self, z_flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Training-mode bookkeeping for dead-code restarts (no host sync)."""
        self._last_z = z_flat.detach()
        if "usage" in self._buffers:
            self.usage.mul_(self.decay).add_(counts.to(self.usage.dtype), alpha=1.0 - self.decay)

    def usage_per_step(self) -> torch.Tensor:
        """EMA of assignments per training step, (K,)."""
        return self.usage

    @torch.no_grad()
    def restart_dead_codes(self, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Replace codes whose usage is below the threshold by random latents of the last training
        batch (sampled with replacement); a codebook learned by gradient also loses ``optimizer``'s Adam
        moments of those rows. Returns the boolean mask (K,) of restarted codes.
        No host sync: the mask is applied with torch.where."""
        if self._last_z is None or self.dead_code_threshold <= 0:
            return torch.zeros(self.num_embeddings, dtype=torch.bool, device=self.codebook.device)
        z = self._last_z
        dead = self.usage_per_step() < self.dead_code_threshold                    # (K,)
        pick = torch.randint(0, z.shape[0], (self.num_embeddings,), device=z.device)
        new = z[pick]                                                                # (K, D)
        self.codebook.data.copy_(torch.where(dead[:, None], self._to_raw(new), at_least_f32(self.codebook.data))
                                 .to(self.codebook.dtype))
        self._reset_usage(dead, new)
        if optimizer is not None and self.codebook.requires_grad:                  # learned by gradient
            state = optimizer.state.get(self.codebook, {})
            keep = (~dead)[:, None].to(self.codebook.dtype)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].mul_(keep)
        return dead

    def _reset_usage(self, dead: torch.Tensor, new: torch.Tensor) -> None:
        T = self.dead_code_threshold
        self.usage.copy_(torch.where(dead, torch.full_like(self.usage, T), self.usage))

    @torch.no_grad()
    def init_from_latents(self, z_flat: torch.Tensor, fit) -> None:
        """--init kmeans|data (``init_from_data``): ``fit(z_flat, K)`` gives (codes, counts per step)."""
        self.load_codes(*fit(z_flat, self.num_embeddings))

    @torch.no_grad()
    def load_codes(self, codes: torch.Tensor, counts_per_step: torch.Tensor) -> None:
        """Set the codes (e.g. from k-means) with usage statistics consistent with them."""
        self.codebook.data.copy_(self._to_raw(codes).to(self.codebook.dtype))
        self.usage.copy_(counts_per_step.to(self.usage.dtype))

    # EMA codebooks (VQ-EMA; BA-VQ --ba_codebook_update ema): buffers ema_cluster_size N (K,) and ema_w m (K, D)
    @torch.no_grad()
    def _ema_codebook_step(self, counts: torch.Tensor, sums: torch.Tensor, overwrite: bool) -> None:
        """N <- decay N + (1 - decay) counts, m <- decay m + (1 - decay) sums, e = m / N~ with
        N~ = (N + eps) / (sum N + K eps) * sum N (Laplace smoothing); ``overwrite`` stores N~ back as N
        (the original code), else N stays raw (Sonnet); cosine: codes renormalised."""
        K = self.num_embeddings
        self.ema_cluster_size.mul_(self.decay).add_(counts.to(self.ema_cluster_size.dtype), alpha=1.0 - self.decay)
        self.ema_w.mul_(self.decay).add_(sums.to(self.ema_w.dtype), alpha=1.0 - self.decay)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + K * self.epsilon) * n   # N~
        if overwrite:
            self.ema_cluster_size.copy_(smoothed)
        codebook = self.ema_w / smoothed[:, None]
        self.codebook.copy_(F.normalize(codebook, dim=1) if self.cosine else codebook)

    def _reset_ema(self, dead: torch.Tensor, new: torch.Tensor, T: float | None = None) -> None:
        """Restarted codes: EMA count T, EMA sum T x code, so the next update starts from the code (T: the
        dead-code threshold, or residual VQ's expiry threshold)."""
        T = self.dead_code_threshold if T is None else T
        self.ema_cluster_size.copy_(torch.where(dead, torch.full_like(self.ema_cluster_size, T), self.ema_cluster_size))
        self.ema_w.copy_(torch.where(dead[:, None], new * T, self.ema_w))

    def _load_ema(self, codes: torch.Tensor, counts_per_step: torch.Tensor) -> None:
        """Data-initialised codes: EMA count = cluster size per step, EMA sum = count x code."""
        self.ema_cluster_size.copy_(counts_per_step)
        self.ema_w.copy_(codes * counts_per_step[:, None])


class VQEMAQuantizer(CodebookQuantizer):
    """Hard nearest-neighbour VQ with an exponential-moving-average codebook.

    van den Oord et al., "Neural Discrete Representation Learning" (2017), Appendix A.1, eqs. (6)-(8):

        N_k <- decay * N_k + (1 - decay) * n_k                      (n_k = #vectors assigned to k)
        m_k <- decay * m_k + (1 - decay) * sum_{x -> k} z_x
        e_k  = m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace smoothing)

    ``ema_smoothing``: ``overwrite`` (the default, the original code) stores the smoothed counts N~ back
    as N, so the next step's EMA starts from them; ``copy`` (DeepMind Sonnet's VectorQuantizerEMA)
    smooths a copy and keeps the raw EMA counts. With the original start state the two differ a lot
    in how fast unused codes recover (docs/method.md, "VQ-EMA").
    The EMA buffers start as in the original code: counts N = ``ema_init_count`` (0), sums m = the
    initial codes (or count x code when ``ema_init_count`` > 0).
    The step's output uses the codebook as it was *before* the step's update, and buffers only
    change in training mode (eval forward leaves ``state_dict()`` bit-identical). Distances and EMA
    maths run in float32 even under autocast (argmin on bf16 distances picks wrong codes).

    Loss: ``commitment_cost * mse(z, sg[z_q])`` (the codebook is not trained by gradient).
    Straight-through estimator ``z + sg[z_q - z]``: the forward pass sees the code, the backward
    pass copies the decoder's gradient to the encoder (the quantizer has no useful derivative).
    Options (off by default): see ``CodebookQuantizer``; with ``cosine`` the EMA averages
    normalised latents and the codes are renormalised after each update; a k-means or restarted
    code gets EMA count c and EMA sum c * code, so the next update starts from that code.
    """

    loss_names = ("commitment_loss",)

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        used = remedies_in_use(cfg, GRADIENT_CODEBOOK_REMEDIES)
        if used:
            return [f"{_they(used, 'acts', 'act')} on a codebook learned by gradient (cvq, affine_reparam: vq and ba_vq; "
                    f"sync_nu, alternate_lr: vq), not on {cfg.quantizer}, whose codes are recomputed from their EMA sums "
                    "every step; use --quantizer vq, or drop them"]
        return []

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float = 0.99, epsilon: float = 1e-5, init: str = "uniform", cosine: bool = False,
                 gradient_estimator: str = "ste", dead_code_threshold: float = 0.0, ema_init_count: float = 0.0,
                 ema_smoothing: str = "overwrite"):
        super().__init__()
        self.ema_smoothing = ema_smoothing
        codebook = self._setup(num_embeddings, embedding_dim, init, cosine, gradient_estimator,
                               dead_code_threshold, decay)
        self.commitment_cost, self.epsilon = commitment_cost, epsilon
        K = num_embeddings
        c = ema_init_count
        self.register_buffer("codebook", codebook)                       # e, (K, D)
        self.register_buffer("ema_cluster_size", torch.full((K,), float(c)))   # N, raw EMA counts (K,)
        # m, EMA sums (K, D): the original code starts them at the codes themselves with counts 0, which makes
        # every code unused in the first step jump to e * decay / (eps-smoothed count) ~ 1e5 e
        self.register_buffer("ema_w", codebook * c if c > 0 else codebook.clone())

    def usage_per_step(self) -> torch.Tensor:
        return self.ema_cluster_size

    def _reset_usage(self, dead, new):
        self._reset_ema(dead, new)

    @torch.no_grad()
    def load_codes(self, codes, counts_per_step):
        self.codebook.copy_(codes)
        self._load_ema(codes, counts_per_step)

    @torch.no_grad()
    def _ema_update(self, z_flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_w).index_add_(0, indices, z_flat)               # sum z_x, (K, D)
        self._ema_codebook_step(counts, sums, overwrite=self.ema_smoothing == "overwrite")

    def _assign(self, d: torch.Tensor) -> torch.Tensor:
        """The code of each latent from its distances d (N, K) to the codes: the nearest."""
        return d.argmin(dim=1)

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = self._latents(z)                                     # (N, D), N = B*H*W
            E = self._codes()                                             # (K, D), pre-update codebook
            d = squared_distances(z_flat, E)                              # (N, K)
            indices = self._assign(d)                                     # (N,)
            z_q_flat = E[indices]                                         # (N, D), a copy
            stats = _code_stats(indices, self.num_embeddings)
            if self.training:
                self._ema_update(z_flat.detach(), indices, stats["code_counts"])
                self._track(z_flat, stats["code_counts"])                 # its usage is the EMA counts
            commitment = self.commitment_cost * F.mse_loss(z_flat, z_q_flat.detach())
            z_q = _unflatten_latents(self._estimate(z_flat, z_q_flat.detach()), z.shape)  # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **stats}
        return z_q, {"commitment_loss": commitment}, info



def ecvq_lengths(cluster_sizes: torch.Tensor, epsilon: float) -> torch.Tensor:
    """ECVQ's code lengths l(k) = -ln Q(k) in nats (K,), Q the Laplace-smoothed running marginal of the hard codes,

        Q(k) = (N_k + eps) / (sum_j N_j + K eps),   N the EMA cluster sizes as stored (VQ-EMA's, decay ``decay``),

    so an unused code has the finite length ln((sum_j N_j + K eps) / eps) (the floor), and with no counts yet
    every code has ln K."""
    K = cluster_sizes.shape[0]
    return torch.log(cluster_sizes.sum() + K * epsilon) - torch.log(cluster_sizes + epsilon)


@torch.no_grad()
def ecvq_batch(x: torch.Tensor, codes: torch.Tensor, lam: float, iterations: int) -> dict:
    """The ECVQ design algorithm of Chou, Lookabaugh & Gray (1989, Sec. III), on a fixed set of vectors x (N, D):
    from ``codes`` (K, D) and lengths ln K, repeat (1) assign each x to argmin_k |x - c_k|^2 + lam l(k), (2) move each
    used code to the centroid of its vectors, (3) set l(k) = -ln(n_k / N) (an unused code's length becomes infinite:
    the paper drops it). Each pass cannot increase the Lagrangian J = D + lam H (D the mean squared error, H the
    entropy of the assignment in nats): step 1 minimises d + lam l for fixed codes and lengths, step 2 minimises D
    for fixed cells, step 3 minimises the mean length, to the entropy, over all lengths that satisfy Kraft's
    inequality. Returns {"codes", "lengths", "indices", "lagrangian": J after each pass}. (The reference for
    ``ECVQQuantizer``, which makes the same three steps online: one batch, EMA centroids and EMA counts.)"""
    c, N, K = codes.clone(), x.shape[0], codes.shape[0]
    lengths = torch.full((K,), math.log(K), dtype=x.dtype, device=x.device)
    history = []
    for _ in range(iterations):
        d = squared_distances(x, c)                                                   # (N, K)
        idx = (d + lam * lengths).argmin(dim=1)                                       # step 1
        n = torch.bincount(idx, minlength=K).to(x.dtype)                              # (K,)
        used = n > 0
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        c = torch.where(used[:, None], sums / n.clamp_min(1)[:, None], c)             # step 2
        p = n / N
        lengths = torch.where(used, -torch.log(p.clamp_min(1e-300)), torch.full_like(p, math.inf))   # step 3
        D = float((x - c[idx]).pow(2).sum(1).mean())
        H = float(-(p[used] * p[used].log()).sum())
        history.append(D + lam * H)
    return {"codes": c, "lengths": lengths, "indices": idx, "lagrangian": history}


class ECVQQuantizer(VQEMAQuantizer):
    """Entropy-constrained VQ (Chou, Lookabaugh & Gray, "Entropy-constrained vector quantization", IEEE Trans.
    ASSP 37(1), 1989), trained online as VQ-EMA is. The hard assignment minimises distortion plus lam x rate:

        k*(z) = argmin_k [ d(z, e_k) + lam l(k) ],   l(k) = -ln Q(k) (nats, ``ecvq_lengths``),

    d the library's squared distance summed over channels (the cosine one with ``cosine``), Q the running marginal
    of the hard codes: the EMA cluster sizes N of VQ-EMA (decay, epsilon; ``ema_smoothing`` as there), Laplace-
    smoothed, so an unused code's length is finite and a restarted code (EMA count := dead_code_threshold T) gets
    Q(k) = (T + eps) / (sum_j N_j + K eps). The codes are VQ-EMA's EMA centroids of what is assigned to them (the
    paper's centroid step, online), with the commitment loss and straight-through estimator of VQ-EMA; training
    and evaluation use the same rule with the Q of the moment (evaluation changes no state). ``ecvq_lambda`` (lam,
    distortion units per nat) sets the rate: 0 is VQ-EMA bit for bit; larger lam trades distortion for fewer bits.
    ``ecvq_batch`` is the paper's batch design algorithm (exact centroids, lengths from counts each pass).
    BA-VQ's evaluation rule argmax_k [ln Q-bar(k) - beta d] is this rule at lam = 1/beta for absolute temperature
    and the same Q (docs/method.md, "ECVQ", says where the two part).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float = 0.99, epsilon: float = 1e-5, init: str = "uniform", cosine: bool = False,
                 gradient_estimator: str = "ste", dead_code_threshold: float = 0.0, ema_init_count: float = 0.0,
                 ema_smoothing: str = "overwrite", ecvq_lambda: float = 0.1):
        super().__init__(num_embeddings, embedding_dim, commitment_cost, decay, epsilon, init, cosine,
                         gradient_estimator, dead_code_threshold, ema_init_count, ema_smoothing)
        self.lam = ecvq_lambda

    def lengths(self) -> torch.Tensor:
        """l(k) = -ln Q(k) (K,), nats, from the EMA cluster sizes as they are now."""
        return ecvq_lengths(self.ema_cluster_size, self.epsilon)

    def _assign(self, d: torch.Tensor) -> torch.Tensor:
        if self.lam == 0:
            return d.argmin(dim=1)                                        # VQ-EMA exactly
        return (d + self.lam * self.lengths().to(d.dtype)[None, :]).argmin(dim=1)   # (N,)

    def extra_metrics(self) -> dict:
        """H(Q) = sum_k Q(k) l(k), the running marginal's entropy in nats (the mean code length the rule charges),
        logged with every epoch."""
        lengths = self.lengths()
        return {"ecvq_marginal_entropy_nats": float(((-lengths).exp() * lengths).sum())}


class VQQuantizer(CodebookQuantizer):
    """Hard nearest-neighbour VQ with a codebook learned by gradient (van den Oord et al. 2017, eq. 3):

        loss = codebook_cost * mse(sg[z], e) + commitment_cost * mse(z, sg[e]),   e = e_{argmin_k d(z, k)}

    both terms on the *hard* code e (never on the straight-through output, whose gradient would
    bypass the codebook), so the codebook is moved only by the codebook term and the encoder only by
    the commitment term and the reconstruction (through the estimator). The straight-through line
    ``z + sg[e - z]`` is applied the same way whatever ``requires_grad`` says.
    Defaults 1.0 and 0.25 are the VQ-VAE paper's. Options: see ``CodebookQuantizer``.
    """

    loss_names = ("commitment_loss", "codebook_loss")

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 codebook_cost: float = 1.0, decay: float = 0.99, init: str = "uniform", cosine: bool = False,
                 gradient_estimator: str = "ste", dead_code_threshold: float = 0.0, cvq: bool = False, cvq_anchor: str = "closest",
                 cvq_decay: float = 0.99, cvq_gain: float = 10.0, cvq_offset: float = 1e-3, affine_reparam: str = "off",
                 affine_momentum: float = 0.1, affine_lr: float = 1.0, cvq_distance: str = "cos",
                 sync_nu: float = 0.0, alternate_lr: float = 0.0, alternate_momentum: float = 0.9,
                 alternate_commitment: bool = False):
        super().__init__()
        codebook = self._setup(num_embeddings, embedding_dim, init, cosine, gradient_estimator,
                               dead_code_threshold, decay)
        self.commitment_cost, self.codebook_cost = commitment_cost, codebook_cost
        self.codebook = nn.Parameter(codebook)                           # E, (K, D)
        self.register_buffer("usage", torch.zeros(num_embeddings))       # EMA assignments per step (K,)
        self._setup_cvq(cvq, cvq_anchor, cvq_decay, cvq_gain, cvq_offset, cvq_distance)
        self._setup_affine(affine_reparam, affine_momentum, affine_lr)
        self.sync_nu, self.alternate_lr, self.alternate_momentum = sync_nu, alternate_lr, alternate_momentum
        # vqtorch's in-place alternation requires beta = 1: its loss has no commitment term
        self.commitment_on = alternate_lr == 0 or alternate_commitment
        if alternate_lr > 0:                                             # SGD momentum buffers of the inner step
            for name, p in self._alternated():
                self.register_buffer(f"alternate_buf_{name}", torch.zeros_like(p))

    def _reset_usage(self, dead: torch.Tensor, new: torch.Tensor) -> None:
        super()._reset_usage(dead, new)
        if self.alternate_lr > 0:                    # a restarted code's SGD momentum belongs to the old code
            self.alternate_buf_codebook.mul_((~dead)[:, None].to(self.alternate_buf_codebook.dtype))

    def _alternated(self) -> list:
        """(name, parameter) of what the alternating step optimises: the codebook, and the learned affine map."""
        return [("codebook", self.codebook)] + ([("affine_s", self.affine_s), ("affine_b", self.affine_b)]
                                                if self.affine == "learned" else [])

    def _alternate_step(self, z_flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Alternating optimisation (Huh et al. 2023; vqtorch's in-place optimizer): before the step's
        losses, one SGD step with momentum (buf <- momentum buf + g; p <- p - lr buf, PyTorch's SGD) on
        the codebook (and learned affine map) for mse(sg[z], c) with this step's assignments; returns
        the codes after it. The step's codebook loss is then only logged (as vqtorch, whose in-place
        optimizer trains the codes alone), and the encoder gets no commitment term (vqtorch's in-place
        mode needs beta = 1, which weights it 0; ``alternate_commitment`` keeps it: our variant)."""
        params = self._alternated()
        with torch.enable_grad():
            loss = F.mse_loss(z_flat.detach(), F.embedding(indices, self._codes()))
            grads = torch.autograd.grad(loss, [p for _, p in params])
        with torch.no_grad():
            for (name, p), g in zip(params, grads):
                buf = getattr(self, f"alternate_buf_{name}")
                buf.mul_(self.alternate_momentum).add_(g)
                p.sub_(self.alternate_lr * buf)
        return self._codes()

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = self._latents(z)                                     # (N, D)
            if self.training:
                self._affine_track(z_flat)
            E = self._codes()                                             # (K, D)
            with torch.no_grad():
                if self.cvq_cos:                                          # CVQ-VAE's lookup: the largest cosine
                    indices = (F.normalize(z_flat, dim=1) @ F.normalize(E, dim=1).t()).argmax(dim=1)
                else:
                    indices = squared_distances(z_flat, E).argmin(dim=1)  # (N,)
            if self.training and self.alternate_lr > 0:
                E = self._alternate_step(z_flat, indices)                 # the codebook first, same assignments
            # (N, D), hard code, differentiable in E. F.embedding, not E[indices]: its CPU backward is
            # deterministic (indexing's backward uses parallel atomic adds), so resumed runs are bit-identical.
            e = F.embedding(indices, E)
            stats = _code_stats(indices, self.num_embeddings)
            if self.training:
                self._track(z_flat, stats["code_counts"])
            e_cb = e.detach() if self.alternate_lr > 0 else e             # alternating: its own step trains the codes
            losses = {"codebook_loss": self.codebook_cost * F.mse_loss(z_flat.detach(), e_cb),
                      "commitment_loss": (self.commitment_cost * F.mse_loss(z_flat, e.detach()) if self.commitment_on
                                          else torch.zeros((), device=z_flat.device))}
            z_q_flat = self._estimate(z_flat, e.detach())                 # (N, D)
            if self.sync_nu:              # synchronized update: + nu (e - sg[e]), same forward value
                z_q_flat = z_q_flat + self.sync_nu * (e - e.detach())
            if self.training:
                self._cvq_step(z_flat, stats["code_counts"])
            z_q = _unflatten_latents(z_q_flat, z.shape)                   # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **stats}
        return z_q, losses, info



def blahut_arimoto(distances: torch.Tensor, beta, iterations: int,
                   log_q0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blahut-Arimoto alternations for the rate-distortion problem, in log space.

    Source: the N rows of ``distances`` (N, K), each with probability 1/N; reproduction alphabet:
    the K codes. Starting from Q(k) = 1/K (or exp(``log_q0``)), each iteration computes

        P(k|x) = Q(k) exp(-beta d(x,k)) / sum_j Q(j) exp(-beta d(x,j))      (log_softmax)
        Q(k)   = (1/N) sum_x P(k|x)                                          (logsumexp - log N)

    (Blahut 1972, Theorem 8; Cover & Thomas, Elements of Information Theory, Sec. 10.8).
    Working with log P and log Q keeps every value finite even for d ~ 1e6 and large beta, where
    exp(-beta d) underflows to 0 in the probability domain. Returns (log P (N, K), log Q (K,)),
    where Q is the mean of the returned P. ``beta`` may be a float or a 0-dim tensor.

    This is the reference implementation (``--ba_impl autograd``). The default fast path,
    ``vqvae_fused._FusedBA``, computes the same thing: change both (see the note there).
    The R(D) analysis runs the same alternation in another form (``vqvae_analysis.rate_distortion_curve``:
    any source weights, Blahut's exp domain in float64, iterated to a convergence certificate), because it
    needs certified points of a curve where training needs a fixed number of log-space steps that autograd
    differentiates and that never underflow; tests/test_rate_distortion.py checks that the two forms give
    the same Q and the same (R, D) after the same number of steps. Change the maths in both.
    """
    N, K = distances.shape
    neg_beta_d = -beta * distances                                                   # (N, K)
    log_q = (torch.full((K,), -math.log(K), dtype=distances.dtype, device=distances.device) if log_q0 is None
             else log_q0.to(distances.dtype))
    log_p = None
    for _ in range(iterations):
        log_p = torch.log_softmax(neg_beta_d + log_q[None, :], dim=1)               # (N, K)
        log_q = torch.logsumexp(log_p, dim=0) - math.log(N)                          # (K,)
    return log_p, log_q


@torch.no_grad()
def blahut_arimoto_hard(distances: torch.Tensor, beta, iterations: int,
                        log_q0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``blahut_arimoto`` with one-hot P (``--ba_assignment hard``): from Q(k) = 1/K (or exp(``log_q0``)), repeat

        k(x) = argmax_k [log Q(k) - beta d(x,k)]       (ECVQ's rule at lam = 1/beta, lengths -log Q)
        Q(k) = n_k / N                                  (the batch's histogram of those codes)

    so a code that no row chose gets Q = 0 (infinite length) and cannot be chosen in later iterations (ECVQ's batch
    algorithm drops such codes too). With ``log_q0`` = log Q-bar and one iteration it is ECVQ's rule with Q-bar as
    the running marginal. Returns (indices (N,), log Q (K,), -inf for unused codes), no gradient. Ties go to the
    lowest index (argmax of the first maximum)."""
    N, K = distances.shape
    neg_beta_d = -beta * distances                                                   # (N, K)
    log_q = (torch.full((K,), -math.log(K), dtype=distances.dtype, device=distances.device) if log_q0 is None
             else log_q0.to(distances.dtype))
    indices = None
    for _ in range(iterations):
        indices = (neg_beta_d + log_q[None, :]).argmax(dim=1)                        # (N,)
        log_q = torch.log(code_histogram(indices, K).to(distances.dtype) / N)        # (K,), -inf where unused
    return indices, log_q


def rate_distortion_point(distances: torch.Tensor, log_p: torch.Tensor,
                          source_weights: torch.Tensor | None = None) -> tuple[float, float]:
    """(R in bits, D) of the conditional P(k|x) (``log_p``, (N, K)) on a source with probabilities
    p(x) = ``source_weights`` (N,) (uniform when None): with Q(k) = sum_x p(x) P(k|x),
    R = I(X; K) = sum_x p(x) sum_k P(k|x) log2(P(k|x) / Q(k)),  D = sum_x p(x) sum_k P(k|x) d(x,k)."""
    N = distances.shape[0]
    w = (torch.full((N,), 1.0 / N, dtype=log_p.dtype, device=log_p.device) if source_weights is None
         else source_weights.to(log_p.device, log_p.dtype))
    log_q = torch.logsumexp(log_p + w.log()[:, None], dim=0)                      # log Q, (K,)
    p = log_p.exp()
    rate = (w[:, None] * p * (log_p - log_q[None, :])).sum() / math.log(2.0)
    dist = (w[:, None] * p * distances).sum()
    return float(rate), float(dist)


class BAQuantizer(CodebookQuantizer):
    """Soft vector quantization by Blahut-Arimoto (BA) assignment, codebook learned by gradient.

    For latents z_x and codes e_k (d = squared Euclidean distance), ``ba_iterations`` BA alternations
    (see ``blahut_arimoto``; Blahut 1972, Arimoto 1972) give soft assignments P(k|x) and the code
    marginal Q(k) = mean_x P(k|x) at inverse temperature beta, cosine-annealed per training step
    from ``beta_start`` to ``beta_end`` (``set_schedule``).

    Training forward: z_q = P.E (soft quantization), passed on with the straight-through line
    ``z + sg[P.E - z]`` (as in the original code: the decoder sees P.E, its gradient is copied to z).
    The BA iterations start from the uniform Q (``ba_prior`` batch, the original code) or from the
    running marginal Q-bar (``ba_prior`` ema). After every training step Q-bar, a buffer, moves
    toward the step's final Q:  Q-bar <- marginal_decay * Q-bar + (1 - marginal_decay) * Q_T  (in log space).

    Eval forward: every latent is assigned on its own, with no statistic of the batch (as batch
    norm uses its running statistics):  P(k|x) = Q-bar(k) exp(-beta d(x,k)) / sum_j (...), hard code
    argmax_k [log Q-bar(k) - beta d(x,k)], z_q = that code, so validation measures the discrete
    bottleneck; the soft P.E is returned as ``info['other_decoder_inputs']['soft']`` and the rate
    I(X;K) = H(Q-bar) - mean_x H(P(.|x)) (bits) as ``info['mutual_information_bits']``. The eval
    losses use P and H(Q-bar) in place of the batch's.

    Losses (all in float32):
      commitment_loss = commitment_cost * mse(z, sg[P.E])            -> encoder
      entropy_loss    = -entropy_cost * H(Q), H in nats               -> encoder and codebook, through
                                                                         every BA iteration
      codebook_loss   = codebook_cost * mse(sg[z], P'.E)              -> codebook only
    Because of the straight-through line the reconstruction loss sends no gradient to the codebook;
    in the original code (``codebook_cost = 0``, which reproduces it exactly) the codebook moves only
    through the entropy term. The codebook term moves each code toward the encoder outputs softly
    assigned to it. sg[z] is taken literally: P' is P recomputed from sg[z] (same values as P), so the
    term sends no gradient into the encoder, through the assignments or otherwise.

    Departures from the original code: the original clamps Q at 1e-10 before taking its log; in log
    space no floor is needed, so codes with Q < 1e-10 keep their exact (tiny) mass.
    Options (off by default): see ``CodebookQuantizer`` (usage for dead codes = hard argmax counts), and
    these, whose reasoning and measured effect are in docs/method.md ("Options beyond the original method"):
      ``ba_temperature relative``: beta multiplies d / d-bar, d-bar the mean distance over the batch's
          (latent, code) pairs (sg[.]; evaluation: its running mean, decay ``marginal_decay``), so the
          assignments do not depend on the scale of the latents (``_effective_beta``).
      ``ba_decoder_input hard | anneal``: the training decoder input is the hard code E[argmax_k P]
          (as in evaluation) or (1 - lam) P.E + lam E[argmax_k P], lam following beta's cosine shape
          from 0 to 1; straight-through either way, and the commitment term pulls z toward that input
          (VQ-VAE's commitment to z_q). Removes the train (soft) / eval (hard) mismatch.
      ``ba_codebook_loss expected``: the codebook term is the expected distortion
          sum_x sum_k P(k|x) |sg[z_x] - e_k|^2 / (N D) at fixed P (``expected_distortion``): each code
          moves toward the latents softly assigned to it, instead of every code along the same
          direction (the mixture term's gradient P(k|x) (P.E - z_x) is shared by all codes).
      ``ba_codebook_update ema``: no codebook gradient; after each training step the codes become
          EMA soft centroids (``_soft_ema_update``), VQ-EMA's update with P in place of hard counts.
    Diagnostics (``train_metrics``, also in evaluation; ``_diagnostics``): the regime of P per epoch.

    Two implementations of the same maths (``ba_impl``): ``autograd`` runs ``blahut_arimoto`` above
    and lets autograd differentiate it (the reference); ``fused`` (the default) runs ``_FusedBA``
    below, one pass with a hand-written backward. To change the maths: edit ``blahut_arimoto`` (and
    this forward's autograd branch), train with ``--ba_impl autograd``, then port the change to
    ``_FusedBA`` (vqvae_fused.py) and run ``pytest tests/test_ba_fused.py`` (fused == autograd in float64).
    """
    loss_names = ("commitment_loss", "entropy_loss", "codebook_loss")
    train_metrics = ("mean_distance", "nearest_distance", "logit_gap", "assignment_entropy_bits", "assignment_max",
                     "marginal_entropy_bits", "beta_effective")
    eval_metrics = ("mutual_information_bits",) + train_metrics

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        problems = []
        used = remedies_in_use(cfg, ("sync_nu", "alternate_lr"))
        if used:
            problems.append(f"{_they(used, 'applies', 'apply')} to vq's hard codes, not to ba_vq, whose decoder input is "
                            "the soft P.E")
        used = remedies_in_use(cfg, ("cvq", "affine_reparam"))
        if cfg.ba_codebook_update != "gradient" and used:
            problems.append(f"{_they(used, 'acts', 'act')} on a codebook learned by gradient, but --ba_codebook_update "
                            f"{cfg.ba_codebook_update} "
                            "recomputes the codes from their EMA sums every step (use --ba_codebook_update gradient)")
        return problems

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 beta_start: float = 0.1, beta_end: float = 5.0, ba_iterations: int = 5,
                 entropy_cost: float = 0.01, codebook_cost: float = 1.0, decay: float = 0.99,
                 init: str = "uniform", cosine: bool = False, gradient_estimator: str = "ste",
                 dead_code_threshold: float = 0.0, ba_impl: str = "fused", ba_chunk_rows: int = 0,
                 ba_prior: str = "batch", marginal_decay: float = 0.99, ba_temperature: str = "absolute",
                 ba_decoder_input: str = "soft", ba_codebook_loss: str = "mixture", ba_codebook_update: str = "gradient",
                 epsilon: float = 1e-5, cvq: bool = False, cvq_anchor: str = "closest",
                 cvq_decay: float = 0.99, cvq_gain: float = 10.0, cvq_offset: float = 1e-3, affine_reparam: str = "off",
                 affine_momentum: float = 0.1, affine_lr: float = 1.0, ema_smoothing: str = "overwrite", cvq_distance: str = "cos",
                 ba_assignment: str = "soft"):
        super().__init__()
        self.ba_assignment = ba_assignment
        self.ba_impl, self.ba_chunk_rows, self.ba_prior, self.marginal_decay = ba_impl, ba_chunk_rows, ba_prior, marginal_decay
        self.ba_temperature, self.ba_decoder_input, self.ba_codebook_loss = ba_temperature, ba_decoder_input, ba_codebook_loss
        self.ba_codebook_update, self.epsilon, self.ema_smoothing = ba_codebook_update, epsilon, ema_smoothing
        self.ema_codes = ba_codebook_update != "gradient"
        self.hard_weight = 0.0                                           # lam of --ba_decoder_input anneal
        codebook = self._setup(num_embeddings, embedding_dim, init, cosine, gradient_estimator,
                               dead_code_threshold, decay)
        self.commitment_cost, self.entropy_cost, self.codebook_cost = commitment_cost, entropy_cost, codebook_cost
        self.beta_start, self.beta_end, self.ba_iterations = beta_start, beta_end, ba_iterations
        if self.ema_codes:                                               # E, (K, D), from its EMA sums
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))  # N, soft counts (K,): 1 each
            self.register_buffer("ema_w", codebook.clone())                       # m = N x code, (K, D)
        else:
            self.codebook = nn.Parameter(codebook)                       # E, (K, D), learned by gradient
        self.register_buffer("beta", torch.tensor(float(beta_start)))    # current inverse temperature
        self.register_buffer("usage", torch.zeros(num_embeddings))       # EMA assignments per step (K,)
        self.register_buffer("log_q_bar", torch.full((num_embeddings,), -math.log(num_embeddings)))  # log Q-bar (K,)
        if ba_temperature == "relative":                                 # running mean distance d-bar (NaN: none yet)
            self.register_buffer("mean_distance", torch.tensor(math.nan))
        self._setup_cvq(cvq, cvq_anchor, cvq_decay, cvq_gain, cvq_offset, cvq_distance)
        self._setup_affine(affine_reparam, affine_momentum, affine_lr)
        self._ba_kernels = None                                          # fused-BA chunk functions (None: eager)
        self._ba_workspace = BAWorkspace()                               # the fused backward's (N, K) accumulators

    def train(self, mode: bool = True):
        """As nn.Module.train; evaluation also lets go of the fused backward's kept accumulators (validation
        does not need them; the next training step allocates them again)."""
        if not mode:
            self._ba_workspace.clear()
        return super().train(mode)

    def compile_kernels(self) -> None:
        """Use torch.compile'd chunk functions in the fused BA pass (``--compile``; same maths)."""
        if self.ba_impl == "fused":
            self._ba_kernels = compiled_ba_kernels()

    def set_schedule(self, t: float, step: int = 0) -> None:
        """Cosine schedule: beta = beta_start at t = 0, beta_end at t = 1; the same shape takes the
        anneal weight lam of the hard code from 0 to 1."""
        self.beta.fill_(cosine_schedule(self.beta_start, self.beta_end, t))
        self.hard_weight = cosine_schedule(0.0, 1.0, t)

    def extra_metrics(self) -> dict:
        return {"beta": float(self.beta), **({"hard_weight": self.hard_weight} if self.ba_decoder_input == "anneal" else {})}

    def forward(self, z: torch.Tensor):
        B, D, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = self._latents(z)                                     # (N, D)
            if self.training:
                self._affine_track(z_flat)
            E = self._codes()                                             # (K, D)
            beta = self._effective_beta(z_flat, E)                        # beta, or beta / d-bar (relative)
            if self.training:
                a = self._ba(z_flat, E, beta)
                with torch.no_grad():                                     # Q-bar <- decay Q-bar + (1 - decay) Q_T
                    w = self.marginal_decay
                    self.log_q_bar.copy_(torch.logaddexp(self.log_q_bar + math.log(w) if w > 0 else
                                                         torch.full_like(self.log_q_bar, -math.inf),
                                                         a["log_q"].detach().float() + math.log(1.0 - w)))
            else:
                a = self._assign_each(z_flat, E, beta)
            log_q, indices = a["log_q"], a["indices"]
            entropy = -torch.where(log_q > -math.inf, log_q.exp() * log_q, 0.0).sum()  # H(Q) (eval: H(Q-bar)), nats
                                                                          # (0 ln 0 = 0: hard Q drops codes)
            z_q_flat = self._decoder_input(a["z_q_soft"], E[indices])     # (N, D), what the decoder sees
            losses = {
                "commitment_loss": self.commitment_cost * F.mse_loss(z_flat, self._commitment_target(a, z_q_flat)),
                "entropy_loss": -self.entropy_cost * entropy,
            }
            if self.ema_codes:                                            # the codebook is not learned by gradient
                losses["codebook_loss"] = torch.zeros((), device=z.device)
            elif self._expected_term:
                losses["codebook_loss"] = self.codebook_cost * expected_distortion(z_flat.detach(), E, a["counts"],
                                                                                   a["sums"])
            elif self.codebook_cost > 0:
                losses["codebook_loss"] = self.codebook_cost * F.mse_loss(z_flat.detach(), a["z_q_cb"])
            else:
                losses["codebook_loss"] = torch.zeros((), device=z.device)
            stats = _code_stats(indices, self.num_embeddings)
            if self.training:
                self._track(z_flat, stats["code_counts"])
                self._cvq_step(z_flat, stats["code_counts"])
                if self.ema_codes:
                    self._soft_ema_update(*self._ema_counts_sums(a, z_flat, stats["code_counts"]))
            z_q = _unflatten_latents(self._estimate(z_flat, z_q_flat.detach()), z.shape)  # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **stats,
                "beta": self.beta.detach().clone(), "entropy": entropy.detach(),
                **self._diagnostics(a["diag"], z_flat.shape[0], E.shape[0], beta, entropy)}
        if not self.training:
            info["other_decoder_inputs"] = {"soft": _unflatten_latents(a["z_q_soft"], z.shape)}
            h_q_bar = -(self.log_q_bar.double().exp() * self.log_q_bar.double()).sum()
            info["mutual_information_bits"] = ((h_q_bar - a["cond_entropy"]) / math.log(2.0)).float()
        return z_q, losses, info

    @property
    def _expected_term(self) -> bool:
        """The codebook term is the expected distortion (needs sum_x P(k|x) z_x from the assignments)."""
        return self.codebook_cost > 0 and self.ba_codebook_loss == "expected" and not self.ema_codes

    @torch.no_grad()
    def _soft_ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """--ba_codebook_update ema: VQ-EMA's update (van den Oord et al. 2017, App. A.1) with the soft
        counts n_k = sum_x P(k|x) and sums m_k = sum_x P(k|x) z_x of this step's final P:
        N <- decay N + (1 - decay) n,  m <- decay m + (1 - decay) m_step,  e = m / N~ with N~ the
        Laplace-smoothed N, smoothed as VQ-EMA smooths it (``--ema_smoothing``: overwrite stores N~ back as N,
        the original code and the default; copy smooths a copy, Sonnet), so that the flagship comparison
        differs in the assignment alone. It is the codebook step of BA / deterministic annealing (each code at
        the centroid of its soft assignments) as a running average; hard P gives VQ-EMA's update."""
        self._ema_codebook_step(counts, sums, overwrite=self.ema_smoothing == "overwrite")

    def _ema_counts_sums(self, a: dict, z_flat: torch.Tensor, code_counts: torch.Tensor) -> tuple:
        """What the codebook's EMA averages: the soft counts sum_x P(k|x) and sums P^T sg[z] (ema), or the hard
        counts and sums of the argmax codes (ema_hard: VQ-EMA's update; with --ba_assignment hard the two agree)."""
        if self.ba_codebook_update == "ema":
            return a["counts"], a["sums"]
        sums = torch.zeros_like(self.ema_w).index_add_(0, a["indices"], z_flat.detach().to(self.ema_w.dtype))  # (K, D)
        return code_counts.to(self.ema_w.dtype), sums

    def _reset_usage(self, dead: torch.Tensor, new: torch.Tensor) -> None:
        super()._reset_usage(dead, new)
        if self.ema_codes:                          # restarted codes: EMA count T, sum T x code (as VQ-EMA)
            self._reset_ema(dead, new)

    @torch.no_grad()
    def load_codes(self, codes: torch.Tensor, counts_per_step: torch.Tensor) -> None:
        super().load_codes(codes, counts_per_step)
        if self.ema_codes:
            self._load_ema(codes, counts_per_step)

    def _commitment_target(self, a: dict, z_q_flat: torch.Tensor) -> torch.Tensor:
        """sg[what the decoder sees in training] (VQ-VAE's commitment to z_q): P.E with the soft input
        (the original code; in eval too, where the losses use the eval P), else the training decoder input."""
        return (a["z_q_soft"] if (self.ba_decoder_input == "soft" or not self.training) else z_q_flat).detach()

    def _decoder_input(self, z_q_soft: torch.Tensor, z_hard: torch.Tensor) -> torch.Tensor:
        """What the decoder sees: in eval always the hard code; in training P.E (soft), the hard code
        (hard), or (1 - lam) P.E + lam x hard code (anneal, lam = ``hard_weight``)."""
        if not self.training or self.ba_decoder_input == "hard":
            return z_hard
        if self.ba_decoder_input == "anneal":
            return z_q_soft + self.hard_weight * (z_hard - z_q_soft)
        return z_q_soft

    def _effective_beta(self, z_flat: torch.Tensor, E: torch.Tensor):
        """The inverse temperature that multiplies d(x, k): beta (absolute), or beta / d-bar (relative),
        d-bar the mean of d over every (latent, code) pair of the batch (training; sg[.], no gradient)
        or its running mean (evaluation; the batch's own before any training step). Multiplying z and
        the codes by c multiplies d and d-bar by c^2, so relative assignments do not change."""
        if self.ba_temperature == "absolute":
            return self.beta
        with torch.no_grad():
            d_bar = mean_pair_distance(z_flat, E)
            if self.training:
                w = self.marginal_decay
                self.mean_distance.copy_(torch.where(torch.isnan(self.mean_distance), d_bar,
                                                     w * self.mean_distance + (1.0 - w) * d_bar))
            else:
                d_bar = torch.where(torch.isnan(self.mean_distance), d_bar, self.mean_distance)
        return self.beta / d_bar.clamp_min(torch.finfo(d_bar.dtype).tiny)

    def _diagnostics(self, diag: torch.Tensor, N: int, K: int, beta, marginal_entropy: torch.Tensor) -> dict:
        """The regime of the BA assignments (``train_metrics`` / ``eval_metrics``; the sums ``diag``
        come from ``distance_sums`` and ``assignment_sums``): mean d over all (latent, code) pairs;
        mean nearest distance min_k d; logit gap = beta_eff x mean (d_(2) - d_(1)), the nearest and
        second-nearest codes' difference in -beta d (>> 1: P sharp, << 1: P almost uniform, apart
        from Q); mean row entropy H(P(.|x)) and mean max_k P(k|x); H(Q) (eval: H(Q-bar)) in bits;
        beta_eff (relative temperature: beta / d-bar)."""
        diag = diag.detach().float()
        beta_eff = beta.detach().float() if torch.is_tensor(beta) else diag.new_tensor(float(beta))
        return {"mean_distance": diag[0] / (N * K), "nearest_distance": diag[1] / N,
                "logit_gap": beta_eff * diag[2] / N, "assignment_entropy_bits": diag[3] / (N * math.log(2.0)),
                "assignment_max": diag[4] / N, "marginal_entropy_bits": marginal_entropy.detach().float() / math.log(2.0),
                "beta_effective": beta_eff}

    def _ba(self, z_flat: torch.Tensor, E: torch.Tensor, beta):
        """Training: the BA iterations on the batch. Returns {z_q_soft: P.E, z_q_cb: P'.E for the mixture
        codebook term (P' from sg[z]), log_q: log Q_T (K,), indices: argmax_k P (N,), counts: sum_x P (K,)
        and sums: P^T sg[z] (K, D) for the expected codebook term or the soft EMA (sg[P]; otherwise not
        computed: None, or an empty tensor from the fused pass), diag: the diagnostics' sums (5,)}."""
        log_q0 = self.log_q_bar.to(z_flat.dtype) if self.ba_prior == "ema" else None
        expected = self._expected_term
        soft_sums = expected or self.ba_codebook_update == "ema"
        N = z_flat.shape[0]
        if self.ba_assignment == "hard":
            return self._ba_hard(z_flat, E, beta, log_q0, soft_sums)
        if self.ba_impl == "fused":
            # one BA pass; z_q_soft carries gradient to E only (sg[z]), log Q to z and E
            z_q_soft, log_q, indices, diag, sums = ba_soft_quantize(
                z_flat, E, beta, self.ba_iterations, self.ba_chunk_rows, self._ba_kernels, log_q0,
                full=True, centroid_sums=soft_sums, workspace=self._ba_workspace)
            counts = (log_q.detach() + math.log(N)).exp()                 # sum_x P_T(k|x) = N Q_T(k)
            return {"z_q_soft": z_q_soft, "z_q_cb": z_q_soft, "log_q": log_q, "indices": indices,
                    "counts": counts, "sums": sums, "diag": diag}
        d = squared_distances(z_flat, E)                                  # reference: autograd throughout
        log_p, log_q = blahut_arimoto(d, beta, self.ba_iterations, log_q0)  # (N, K), (K,)
        z_q_soft = log_p.exp() @ E                                        # (N, D)
        z_q_cb = z_q_soft
        if (self.codebook_cost > 0 and not expected and not self.ema_codes and torch.is_grad_enabled()
                and z_flat.requires_grad):
            # P' from sg[z]: same values as P, but no path back into the encoder.
            log_p_sg, _ = blahut_arimoto(squared_distances(z_flat.detach(), E), beta, self.ba_iterations, log_q0)
            z_q_cb = log_p_sg.exp() @ E                                   # (N, D)
        with torch.no_grad():
            p = log_p.exp()
            diag = torch.cat([distance_sums(d), assignment_sums(log_p, p)])
            counts = p.sum(0)                                             # (K,)
            sums = p.t() @ z_flat if soft_sums else None                  # (K, D)
        return {"z_q_soft": z_q_soft, "z_q_cb": z_q_cb, "log_q": log_q, "indices": log_p.argmax(dim=1),
                "counts": counts, "sums": sums, "diag": diag}

    def _ba_hard(self, z_flat: torch.Tensor, E: torch.Tensor, beta, log_q0, sums: bool) -> dict:
        """--ba_assignment hard: ``blahut_arimoto_hard`` on the batch (no gradient through the assignment), P one-hot.
        The decoder input and the codebook term's P.E are the chosen codes E[k] (gradient to E only); H(Q) of the
        histogram has no gradient, so the entropy loss does nothing here. Same returns as ``_ba``."""
        with torch.no_grad():
            d = squared_distances(z_flat.detach(), E.detach())                           # (N, K)
            indices, log_q = blahut_arimoto_hard(d, beta, self.ba_iterations, log_q0)
            counts = code_histogram(indices, E.shape[0]).to(z_flat.dtype)                 # (K,)
            N = z_flat.shape[0]
            diag = torch.cat([distance_sums(d), d.new_tensor([0.0, float(N)])])          # H(P(.|x)) = 0, max P = 1
            s = torch.zeros_like(E).index_add_(0, indices, z_flat.detach()) if sums else None   # (K, D)
        z_q = F.embedding(indices, E)                                                     # (N, D)
        return {"z_q_soft": z_q, "z_q_cb": z_q, "log_q": log_q, "indices": indices, "counts": counts, "sums": s,
                "diag": diag}

    def _assign_each(self, z_flat: torch.Tensor, E: torch.Tensor, beta):
        """Evaluation: each latent on its own, P(k|x) = softmax_k(log Q-bar(k) - beta d(x,k)), in row
        chunks. Returns {z_q_soft: P.E (N, D), z_q_cb: the same, log_q: log Q-bar, indices: argmax_k P (N,),
        cond_entropy: mean_x H(P(.|x)) in nats (0-dim, float64), counts, sums (only for the expected
        codebook term, else None), diag (as ``_ba``)}."""
        N = z_flat.shape[0]
        C = ba_chunk_rows(N, E.shape[0], self.ba_chunk_rows, z_flat.device)
        log_q_bar = self.log_q_bar.to(z_flat.dtype)
        expected = self._expected_term
        parts = []
        for s in range(0, N, C):
            d = squared_distances(z_flat[s:s + C], E)                                     # (C, K)
            log_p = torch.log_softmax(log_q_bar - beta * d, dim=1)                        # (C, K)
            if self.ba_assignment == "hard":                                              # P one-hot at the argmax
                idx = log_p.argmax(dim=1)
                p = F.one_hot(idx, E.shape[0]).to(d.dtype)                                # (C, K)
                parts.append((p @ E, idx, d.new_zeros((), dtype=torch.float64),           # H(P(.|x)) = 0
                              torch.cat([distance_sums(d), d.new_tensor([0.0, float(d.shape[0])])]),
                              p.sum(0), p.t() @ z_flat[s:s + C] if expected else None))
                continue
            p = exp_normal(log_p)
            parts.append((p @ E, log_p.argmax(dim=1), -(p * log_p).sum(1).double().sum(),  # float64: I(X;K) is a
                          torch.cat([distance_sums(d), assignment_sums(log_p, p)]),       # small difference of
                          p.sum(0), p.t() @ z_flat[s:s + C] if expected else None))       # entropies
        z_q_soft = torch.cat([p[0] for p in parts])                                       # (N, D)
        return {"z_q_soft": z_q_soft, "z_q_cb": z_q_soft, "indices": torch.cat([p[1] for p in parts]),
                "cond_entropy": sum(p[2] for p in parts) / N, "diag": sum(p[3] for p in parts),
                "counts": sum(p[4] for p in parts), "sums": sum(p[5] for p in parts) if expected else None,
                "log_q": log_q_bar}


def mean_pair_distance(z_flat: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """mean over all N x K pairs of |z_x - e_k|^2 = var(z) + var(e) + |mean z - mean e|^2 (var: the mean
    squared distance to the mean), without forming the (N, K) matrix."""
    z_bar, e_bar = z_flat.mean(0), E.mean(0)
    return ((z_flat - z_bar).pow(2).sum(1).mean() + (E - e_bar).pow(2).sum(1).mean()
            + (z_bar - e_bar).pow(2).sum())


def assignment_sums(log_p: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """(2,): over the rows of log P (c, K), the sums of H(P(.|x)) (nats) and of max_k P(k|x);
    ``p``: P itself when the caller has it (else exp(log P))."""
    p = exp_normal(log_p) if p is None else p
    return torch.stack([-(p * log_p).sum(), log_p.max(dim=1).values.exp().sum()])


def expected_distortion(z: torch.Tensor, E: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """(1 / (N D)) sum_x sum_k P(k|x) |z_x - e_k|^2 with P held fixed, from counts n_k = sum_x P(k|x)
    (K,) and sums m_k = sum_x P(k|x) z_x (K, D):  (sum_x |z_x|^2 + sum_k n_k |e_k|^2 - 2 sum_k e_k.m_k) / (N D)
    (rows of P sum to 1). Its gradient 2 (n_k e_k - m_k) / (N D) moves each code toward the centroid of
    the latents softly assigned to it: the codebook step of Blahut-Arimoto / deterministic annealing
    (Rose 1998, the centroid condition), and by the envelope theorem the gradient of the BA objective at fixed P."""
    return (z.pow(2).sum() + (counts * E.pow(2).sum(1)).sum() - 2.0 * (E * sums).sum()) / z.numel()


# The FSQ paper's recommended levels (Mentzer et al. 2023, Sec. 4.1) for codebooks of about 2^8 .. 2^16 codes
FSQ_PAPER_LEVELS = "K~2^8: 8 6 5; 2^10: 8 5 5 5; 2^12: 7 5 5 5 5; 2^14: 8 8 8 6 5; 2^16: 8 8 8 5 5 5"


class FSQQuantizer(Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
    Simple", Sec. 3): no codebook to collapse.

    z (B, D, H, W) is projected to d = len(levels) channels, each bounded to L_i values with
    f(h) = tanh(h + s) * (L-1)(1+1e-3)/2 - o  (o = 0.5 for even L, s = atanh(o / half)), rounded
    with a straight-through estimator, scaled by L_i // 2 to about [-1, 1], and projected back to D.
    The implicit codebook has K = prod(levels) codes; index = mixed-radix number of the per-channel
    levels (``codes_to_indices`` / ``indices_to_codes`` are exact inverses). No loss terms.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, fsq_levels: list | tuple = (8, 8, 8)):
        super().__init__()
        levels = torch.tensor(list(fsq_levels), dtype=torch.long)
        K = int(levels.prod())                     # = num_embeddings (config_problems)
        self.num_embeddings, self.embedding_dim = K, embedding_dim
        self.register_buffer("levels", levels)
        self.register_buffer("basis", torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels[:-1]]), 0))
        self.proj_in = nn.Linear(embedding_dim, len(levels))
        self.proj_out = nn.Linear(len(levels), embedding_dim)

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        K = math.prod(cfg.fsq_levels)
        if K != cfg.codebook_size:
            return [f"fsq_levels {cfg.fsq_levels} give {K} codes but codebook_size is {cfg.codebook_size} (give "
                    f"--codebook_size {K} too, or remove codebook_size from the config file, or choose levels whose "
                    f"product is {cfg.codebook_size}; the FSQ paper's level sets: {FSQ_PAPER_LEVELS})"]
        return []

    @classmethod
    def complete_config(cls, given: dict) -> dict:
        """Only --fsq_levels given: K = their product. Only --codebook_size given: the default levels
        (an error unless they match). Both: they must agree (config_problems)."""
        if "codebook_size" not in given:
            given = {**given, "codebook_size": math.prod(given.get("fsq_levels", Config().fsq_levels))}
        return given

    def _half_width(self):
        return (self.levels // 2).to(self.proj_out.weight.dtype)

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        L = self.levels.to(h.dtype)
        half = (L - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(h + shift) * half - offset

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Scaled codes (..., d) in {-L//2 .. } / (L//2) -> indices (...) in [0, K)."""
        digits = (codes * self._half_width() + self._half_width()).round().long()   # 0 .. L-1
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices[..., None] // self.basis) % self.levels                   # (..., d)
        return (digits.to(self.proj_out.weight.dtype) - self._half_width()) / self._half_width()

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.indices_to_codes(indices)).permute(0, 3, 1, 2)   # (B, H, W) -> (B, D, H, W)

    def rate_distortion_source(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounded projections h (N, d) and the K integer grid points (in level units: rounding h is the
        nearest grid point), so distortion is FSQ's rounding error, squared and summed over the d values."""
        h = self.bound(self.proj_in(_flatten_latents(z)))                             # (N, d)
        lattice = self.indices_to_codes(torch.arange(self.num_embeddings, device=z.device)) * self._half_width()
        return h, lattice                                                               # (K, d)

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = _flatten_latents(z)                                  # (N, D)
            h = self.bound(self.proj_in(z_flat))                          # (N, d), in (-L/2, L/2)
            q = straight_through(h, h.round())                            # integer levels, STE
            codes = q / self._half_width()                                # (N, d) in [-1, 1]
            indices = self.codes_to_indices(codes.detach())               # (N,)
            z_q = _unflatten_latents(self.proj_out(codes), z.shape)      # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **_code_stats(indices, self.num_embeddings)}
        return z_q, {}, info


class SimVQQuantizer(Quantizer):
    """SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One
    Linear Layer"): the codebook is a frozen random matrix C (K, D), entries N(0, 1/D), reparameterised
    by one learned linear layer, codes e_k = W c_k + b (W (D, D), b (D,); nn.Linear, PyTorch's default
    init). Nearest code by squared distance, straight-through estimator, and the VQ-VAE losses on the
    hard code (as ``VQQuantizer``):

        loss = codebook_cost * mse(sg[z], e) + commitment_cost * mse(z, sg[e])

    so the codebook term trains W and b, never C, and every code moves whenever W does (the paper's
    argument against collapse: a gradient step on W updates the whole codebook, not only the chosen
    codes). Defaults 1.0 and 0.25. The codebook remedies (init, restarts, cosine, rotation) do not apply.
    """
    loss_names = ("commitment_loss", "codebook_loss")
    remedies_note = "whose codebook is a frozen random matrix times a learned linear layer"

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 codebook_cost: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.codebook_cost = commitment_cost, codebook_cost
        self.register_buffer("frozen_codebook", torch.randn(num_embeddings, embedding_dim) * embedding_dim ** -0.5)
        self.proj = nn.Linear(embedding_dim, embedding_dim)              # W, b

    def codes(self) -> torch.Tensor:
        """e = C W^T + b, (K, D), differentiable in W and b."""
        return F.linear(self.frozen_codebook, at_least_f32(self.proj.weight), at_least_f32(self.proj.bias))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codes()[indices].permute(0, 3, 1, 2)              # (B, H, W) -> (B, D, H, W)

    def rate_distortion_source(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents and the projected codes e = C W^T + b."""
        return _flatten_latents(z), self.codes()

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = _flatten_latents(z)                                  # (N, D)
            E = self.codes()                                              # (K, D)
            with torch.no_grad():
                indices = squared_distances(z_flat, E).argmin(dim=1)      # (N,)
            e = F.embedding(indices, E)                                   # (N, D), differentiable in W, b
            losses = {"commitment_loss": self.commitment_cost * F.mse_loss(z_flat, e.detach()),
                      "codebook_loss": self.codebook_cost * F.mse_loss(z_flat.detach(), e)}
            z_q = _unflatten_latents(straight_through(z_flat, e.detach()), z.shape)   # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **_code_stats(indices, self.num_embeddings)}
        return z_q, losses, info


OPTVQ_STD_GUARD = 1e-6          # OptVQ's code: added to the std when the distances are z-scored
OPTVQ_SUM_GUARD = 1e-8          # OptVQ's code: added to every sum that Sinkhorn divides by


def optvq_normalized_cost(dist: torch.Tensor) -> torch.Tensor:
    """OptVQ's cost normalisation (their ``normalize_mode`` "all"): the (N, K) Euclidean distances z-scored over the
    whole matrix, (C - mean C) / (std C + 1e-6) with the unbiased std, then shifted so that the minimum is 0."""
    c = (dist - dist.mean()) / (dist.std() + OPTVQ_STD_GUARD)
    return c - c.min()


def optvq_sinkhorn(cost: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """OptVQ's transport plan (their ``sinkhorn``, plain domain as they wrote it) for the cost C (N, K): the Gibbs
    kernel exp(-eps C), normalised to total mass 1, then ``iterations`` times every code's column scaled to mass 1/K
    and every latent's row to mass 1/N (each sum + 1e-8); returned times N, so each row sums to 1. The last step fixes
    the rows, so the codes' marginal is uniform only approximately after a few iterations. (N, K)."""
    N, K = cost.shape
    P = torch.exp(-cost * epsilon)                                                    # (N, K)
    P = P / (P.sum() + OPTVQ_SUM_GUARD)
    for _ in range(iterations):
        P = P / (P.sum(0, keepdim=True) + OPTVQ_SUM_GUARD) / K                        # codes -> 1/K each
        P = P / (P.sum(1, keepdim=True) + OPTVQ_SUM_GUARD) / N                        # latents -> 1/N each
    return P * N


def combined_code_metrics(indices: torch.Tensor, K: int) -> dict:
    """Metrics of the combined code of each position, the tuple (k_1, .., k_S) of its S codes from an alphabet of K
    (indices (N, S, ...)), as one mixed-radix number: distinct tuples used, their perplexity and entropy in bits."""
    S = indices.shape[1]
    k = indices.transpose(0, 1).reshape(S, -1)                              # (S, positions)
    if K ** S >= 2 ** 63:                                                    # too many tuples for one int64
        combined = torch.unique(k, dim=1, return_counts=True)[1]
    else:
        radix = torch.tensor([K ** s for s in range(S)], device=k.device)
        combined = torch.unique((k * radix[:, None]).sum(0), return_counts=True)[1]
    return {"combined_codes": int(combined.numel()), "combined_perplexity": float(perplexity_from_counts(combined)),
            "combined_entropy_bits": float(entropy_bits(combined))}


class OptVQQuantizer(Quantizer):
    """OptVQ (Zhang et al. 2024, "Preventing Local Pitfalls in Vector Quantization via Optimal Transport", arXiv
    2412.15195) as the authors' code (zbr17/OptVQ, src/optvq/models/quantizer.py: VectorQuantizerSinkhorn, sinkhorn)
    under their CIFAR-10 config (configs/cifar10/optvq.yaml), where it differs from the class defaults.

    Codes e = W c_k + b: a table C (K, d) ~ N(0, 1) (nn.Embedding's init) through a learned nn.Linear(d, d) (weight
    N(0, 1/d), PyTorch's default bias), both trained. Each latent (D channels) is cut into ``optvq_heads`` contiguous
    sub-vectors of d = D / heads channels (their config: 4), all coded from the one codebook in one transport problem.
    Assignment, under no gradient, for the batch's N sub-vectors:

        C~ = optvq_normalized_cost(|x - e_k|)   (Euclidean distance, z-scored over the (N, K) matrix, min 0)
        P  = optvq_sinkhorn(C~, eps, iterations) (a plan with rows ~1 and code masses ~N/K: the uniform marginal)
        k(x) = argmax_k P(x, k)                  (their use_prob False; the class default samples from P)

    so the codes are forced toward equal use (BA-VQ re-estimates the marginal instead; docs/method.md, "OptVQ").
    Loss (their loss_q_type l2, beta 0.25, the weights the other way round from VQ-VAE's):
        commitment_cost * mse(x, sg[e_k]) + codebook_cost * mse(sg[x], e_k)     (1 and 0.25)
    and the straight-through estimator. Evaluation (``optvq_eval``): ``sinkhorn``, as their code, runs the same
    transport over the evaluation batch, so a latent's code depends on its batch (``batch_dependent``: validation runs
    at the training batch size); ``nearest`` codes each latent on its own by the nearest code. Either way validation
    also reports the other rule's reconstruction (``psnr_nearest`` or ``psnr_sinkhorn``) and the share of codes on
    which the two agree (``code_agreement``). With several heads a position carries several codes:
    ``code_indices`` is (B, heads, H, W), the histogram has heads x K entries (head h owns [h K, (h+1) K)), the rate
    ``code_entropy_bits`` is the sum of the heads' code entropies (an upper bound on the position's entropy; the
    tuple's own is ``combined_entropy_bits``). The codebook remedies do not apply (their code has none).
    """
    loss_names = ("commitment_loss", "codebook_loss")
    eval_metrics = ("code_agreement",)
    remedies_note = "whose codes are a learned table through a learned linear layer, assigned by optimal transport"

    @classmethod
    def complete_config(cls, given: dict) -> dict:
        """Their loss weights where the shared fields were not given: commitment 1, codebook (their beta) 0.25."""
        return {"commitment_cost": 1.0, "codebook_cost": 0.25, **given}

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        if cfg.latent_dim % cfg.optvq_heads:
            return [f"optvq_heads {cfg.optvq_heads} must divide latent_dim {cfg.latent_dim} (each head codes "
                    f"latent_dim / heads channels); choose a divisor, e.g. --optvq_heads 1"]
        return []

    @classmethod
    def batch_dependent(cls, cfg: Config) -> bool:
        return cfg.optvq_eval == "sinkhorn"

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 1.0,
                 codebook_cost: float = 0.25, optvq_heads: int = 4, optvq_epsilon: float = 10.0,
                 optvq_iterations: int = 5, optvq_eval: str = "sinkhorn"):
        super().__init__()
        self.codes_per_head, self.heads = num_embeddings, optvq_heads
        self.codes_per_position = optvq_heads
        self.num_embeddings = optvq_heads * num_embeddings                   # histogram size, heads x K
        self.embedding_dim, self.head_dim = embedding_dim, embedding_dim // optvq_heads
        self.commitment_cost, self.codebook_cost = commitment_cost, codebook_cost
        self.epsilon, self.iterations, self.eval_rule = optvq_epsilon, optvq_iterations, optvq_eval
        self.alphabet_note = " and ".join(
            ([f"with {optvq_heads} heads a position is reproduced by a tuple of codes, an alphabet of K^{optvq_heads} "
              "vectors that is not enumerated (--optvq_heads 1 for the analysis)"] if optvq_heads > 1 else []) +
            (["its evaluation codes (--optvq_eval sinkhorn) depend on the batch, not on each latent alone "
              "(--optvq_eval nearest for the analysis)"] if optvq_eval == "sinkhorn" else []))
        d = self.head_dim
        self.table = nn.Parameter(torch.randn(num_embeddings, d))         # C, (K, d): nn.Embedding's N(0, 1)
        self.proj = nn.Linear(d, d)                                       # W, b
        nn.init.normal_(self.proj.weight, std=d ** -0.5)

    def codes(self) -> torch.Tensor:
        """e = C W^T + b, (K, d), differentiable in C, W and b."""
        return F.linear(at_least_f32(self.table), at_least_f32(self.proj.weight), at_least_f32(self.proj.bias))

    def _sub_vectors(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B*H*W*heads, d): each position's D channels cut into ``heads`` contiguous chunks, row
        r = (position r // heads, head r % heads), as their view(-1, d)."""
        return _flatten_latents(z).reshape(-1, self.head_dim)

    def assign(self, x: torch.Tensor, E: torch.Tensor, rule: str, d2: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (N,) of the rows x (N, d): ``sinkhorn`` (the batch's transport plan's argmax) or ``nearest``;
        ``d2``: their squared distances (N, K) when the caller has them."""
        with torch.no_grad():
            d2 = squared_distances(x, E) if d2 is None else d2            # (N, K)
            if rule == "nearest":
                return d2.argmin(dim=1)
            cost = optvq_normalized_cost(d2.clamp_min(0).sqrt())          # Euclidean, as their cdist
            return optvq_sinkhorn(cost, self.epsilon, self.iterations).argmax(dim=1)

    def _index_layout(self, idx: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """(B*H*W*heads,) -> (B, H, W) with one head, else (B, heads, H, W)."""
        idx = idx.reshape(B, H, W, self.heads)
        return idx[..., 0] if self.heads == 1 else idx.permute(0, 3, 1, 2)

    def _histogram(self, idx: torch.Tensor) -> torch.Tensor:
        """(heads x K,) counts: head h's code k at h K + k."""
        owner = torch.arange(self.heads, device=idx.device).repeat(idx.numel() // self.heads) * self.codes_per_head
        return code_histogram(idx + owner, self.num_embeddings)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) or (B, heads, H, W) -> (B, D, H, W)."""
        if self.heads == 1:
            indices = indices[:, None]
        B, S, H, W = indices.shape
        e = self.codes()[indices.permute(0, 2, 3, 1)]                    # (B, H, W, heads, d)
        return e.reshape(B, H, W, S * self.head_dim).permute(0, 3, 1, 2)

    def histogram_metrics(self, counts: torch.Tensor, n_images: int) -> dict:
        if self.heads == 1:
            return {}
        per_head = counts.reshape(self.heads, self.codes_per_head)        # (heads, K)
        out, bits = {}, 0.0
        for h, c in enumerate(per_head, 1):
            out[f"head{h}_perplexity"] = float(perplexity_from_counts(c))
            bits += float(entropy_bits(c))
        out["shared_usage_rate"] = float(usage_from_counts(per_head.sum(0)))   # codes used by any head
        positions = float(per_head[0].sum()) / max(n_images, 1)
        return {**out, "code_entropy_bits": bits, "bits_per_image": bits * positions}

    def code_set_metrics(self, indices: torch.Tensor) -> dict:
        return {} if self.heads == 1 else combined_code_metrics(indices, self.codes_per_head)

    def rate_distortion_source(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The latents and the projected codes, with one head and per-latent evaluation (``alphabet_note`` says why
        not otherwise); the sub-vectors in the order of ``code_indices`` in general."""
        return None if self.alphabet_note else (self._rows_in_code_order(z), self.codes())

    def _rows_in_code_order(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> the sub-vectors (B*heads*H*W, d) in the order of ``code_indices`` flattened."""
        B, D, H, W = z.shape
        x = at_least_f32(z.reshape(B, self.heads, self.head_dim, H, W).permute(0, 1, 3, 4, 2))   # (B, heads, H, W, d)
        return x.reshape(-1, self.head_dim)

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            x = self._sub_vectors(z)                                      # (N, d), N = B*H*W*heads
            E = self.codes()                                              # (K, d)
            rule = "sinkhorn" if self.training else self.eval_rule
            with torch.no_grad():
                d2 = squared_distances(x, E)                              # (N, K), for both rules in evaluation
            idx = self.assign(x, E, rule, d2)                             # (N,)
            e = F.embedding(idx, E)                                       # (N, d), differentiable in C, W, b
            losses = {"commitment_loss": self.commitment_cost * F.mse_loss(x, e.detach()),
                      "codebook_loss": self.codebook_cost * F.mse_loss(x.detach(), e)}
            z_q = _unflatten_latents(straight_through(x, e.detach()).reshape(B * H * W, -1), z.shape)   # (B, D, H, W)
            counts = self._histogram(idx)
        info = {"code_indices": self._index_layout(idx, B, H, W), "code_counts": counts,
                "perplexity": perplexity_from_counts(counts), "usage_rate": usage_from_counts(counts)}
        if not self.training:                                             # the other rule, for comparison
            other = "nearest" if rule == "sinkhorn" else "sinkhorn"
            idx2 = self.assign(x, E, other, d2)
            info["other_decoder_inputs"] = {other: _unflatten_latents(E[idx2].reshape(B * H * W, -1), z.shape)}
            info["code_agreement"] = (idx2 == idx).float().mean()
        return z_q, losses, info


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """i.i.d. Gumbel(0, 1) samples shaped like ``like``: -log(-log U), U ~ U(0, 1) from the global RNG
    (the clamp only keeps an exact U = 0 finite)."""
    u = torch.rand_like(like).clamp_min_(torch.finfo(like.dtype).tiny)
    return -(-u.log()).log()


class SQVAEQuantizer(TableQuantizer):
    """Gaussian SQ-VAE (Takida et al. 2022, "SQ-VAE: Variational Bayes on Discrete Representation with
    Self-annealed Stochastic Quantization", ICML, Sec. 3-4; as in the authors' sony/sqvae, vision/,
    the "gaussian_1" variant: one learned scalar variance).

    Stochastic quantization: a latent z (one position, D values) takes code b_k with the posterior

        P(k|z) = softmax_k( -||z - b_k||^2 / (2 sigma^2) ),     sigma^2 = 1 + exp(s)

    (sony/sqvae: sigma^2 = exp(0) + exp(s), s a learned scalar starting at ``sq_log_var_init`` = log 20).
    sigma^2 is trained by the ELBO and shrinks as the encoder commits to its codes: the self-annealing.
    Training: the decoder receives the Gumbel-softmax relaxation (Jang et al. 2017) of a sample of P,

        z_q = sum_k y_k b_k,   y = softmax((log P + g) / tau),   g_k ~ Gumbel(0, 1) i.i.d.,

    soft and without a straight-through line (the gradient reaches z, b and s through y), with the
    temperature tau = max(tau_0 exp(-r n), tau_min) at the n-th training step, n = 1, 2, ...
    (``sq_temperature_init/decay/min``; sony/sqvae: 1, 1e-5, 0). The training histogram counts the
    sampled code argmax_k y_k. Evaluation: the deterministic nearest code (argmax P = argmin distance),
    as sony/sqvae reports its test numbers.
    The ELBO's latent terms per image (sum over the H*W positions, mean over the batch), as in sony/sqvae:

        kld_discrete   = sum_positions sum_k P log P           (-entropy; the constant log K is dropped)
        kld_continuous = sum_positions ||z - z_q||^2 / (2 sigma^2)

    with the ar-ELBO reconstruction term (D_x / 2) log(sum_pixels (x - x_hat)^2) (Lin et al. 2021; the
    sony/sqvae CIFAR-10 setting; ``sq_arelbo``), D_x = the image's values (3 x 32 x 32). The loss is this
    objective divided by D_x, so that its terms sit on the per-value scale of recon_loss (Adam(W) updates
    do not depend on the scale of the loss, up to its eps): loss_dict holds the two KL terms / D_x
    (= their mean over positions / ``image_values_per_position``) and ``reconstruction_objective`` gives
    0.5 log recon_loss (equal to (D_x/2) log(...) / D_x up to a constant; --no_sq_arelbo: recon_loss).
    Codebook b (K, D): N(0, 1) (sony/sqvae: torch.randn), learned by gradient through these terms only.
    The codebook remedies do not apply (its stochastic quantization is the remedy).
    """
    loss_names = ("kld_discrete", "kld_continuous")
    remedies_note = "whose stochastic quantization is its own remedy against collapse"

    def __init__(self, num_embeddings: int, embedding_dim: int, sq_log_var_init: float = math.log(20.0),
                 sq_temperature_init: float = 1.0, sq_temperature_decay: float = 1e-5,
                 sq_temperature_min: float = 0.0, sq_arelbo: bool = True):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tau_init, self.tau_decay, self.tau_min = sq_temperature_init, sq_temperature_decay, sq_temperature_min
        self.arelbo = sq_arelbo
        self.codebook = nn.Parameter(torch.randn(num_embeddings, embedding_dim))       # b, (K, D)
        self.log_var = nn.Parameter(torch.tensor(float(sq_log_var_init)))              # s
        self.register_buffer("temperature", torch.tensor(float(sq_temperature_init)))  # tau of the current step

    def variance(self) -> torch.Tensor:
        """sigma^2 = 1 + exp(s), 0-dim."""
        return 1.0 + at_least_f32(self.log_var).exp()

    def set_schedule(self, t: float, step: int = 0) -> None:
        """tau = max(tau_0 exp(-r n), tau_min) for the n-th step, n = step + 1 (sony/sqvae counts from 1)."""
        self.temperature.fill_(max(self.tau_init * math.exp(-self.tau_decay * (step + 1)), self.tau_min))

    def reconstruction_objective(self, recon_loss: torch.Tensor) -> torch.Tensor:
        return 0.5 * recon_loss.log() if self.arelbo else recon_loss

    def extra_metrics(self) -> dict:
        return {"sq_variance": float(self.variance().detach()), "sq_temperature": float(self.temperature)}

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = _flatten_latents(z)                                  # (N, D)
            E = at_least_f32(self.codebook)                              # (K, D)
            var = self.variance()
            log_p = (-squared_distances(z_flat, E) / (2.0 * var)).log_softmax(1)   # (N, K), log P(k|z)
            if self.training:
                y = ((log_p + gumbel_noise(log_p)) / self.temperature).softmax(1)   # (N, K), relaxed one-hot
                z_q_flat = y @ E                                                    # (N, D)
                indices = y.argmax(1)                                               # the sampled code
            else:
                indices = log_p.argmax(1)                                           # nearest code
                z_q_flat = F.embedding(indices, E)
            per_value = 1.0 / self.image_values_per_position      # per image / D_x = mean over positions / this
            losses = {"kld_discrete": (log_p.exp() * log_p).sum(1).mean() * per_value,
                      "kld_continuous": ((z_flat - z_q_flat).pow(2).sum(1) / (2.0 * var)).mean() * per_value}
            z_q = _unflatten_latents(z_q_flat, z.shape)                             # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **_code_stats(indices, self.num_embeddings)}
        return z_q, losses, info


def sign_patterns(d: int) -> torch.Tensor:
    """The 2^d sign vectors {-1, +1}^d (2^d, d), row k the bits of k, least significant first (+1 for a 1)."""
    bits = (torch.arange(2 ** d)[:, None] // 2 ** torch.arange(d)) % 2
    return bits.to(torch.get_default_dtype()) * 2 - 1


class LFQQuantizer(Quantizer):
    """Lookup-free quantization (Yu et al. 2023, "Language Model Beats Diffusion: Tokenizer is Key to
    Visual Generation" (MAGVIT-v2), Sec. 3.1). The latent z (D) is projected to d = log2 K values
    h = W_in z + b_in (a linear layer, as lucidrains' vector-quantize-pytorch when D != d), each
    quantized to its sign, q_i = +1 if h_i > 0 else -1, with a straight-through estimator, and projected
    back (W_out q + b_out). The implicit codebook is {-1, +1}^d; index = sum_i 2^(i-1) 1[h_i > 0] (the
    paper's; the first value is the least significant bit). Losses:

        commitment_loss        = commitment_cost * mse(h, sg[q])
        sample_entropy_loss    =  lfq_entropy_cost * E_x[ H(p(.|x)) ]
        codebook_entropy_loss  = -lfq_entropy_cost * lfq_diversity_gamma * H( E_x[p(.|x)] )

    with p(k|x) = softmax_k(2 beta <h_x, c_k>) over all K codes c_k in {-1, +1}^d, beta =
    ``lfq_inv_temperature`` (defaults 0.1, 1.0, 100: lucidrains' and Open-MAGVIT2's; commitment 0.25:
    Open-MAGVIT2's). Entropies in nats, E_x the mean over the batch's positions.
    Relation to BA-VQ: since ||c_k||^2 = d for every code, 2 beta <h, c_k> = -beta ||h - c_k||^2 + const,
    so p(k|x) is exactly the first Blahut-Arimoto assignment P(k|x) ∝ Q(k) exp(-beta d(x, k)) from a
    uniform Q, and E_x[p] is its marginal Q. The codebook-entropy term is BA-VQ's -entropy_cost H(Q) (it
    spreads the batch over the codes); LFQ adds the per-sample entropy, which makes each assignment
    confident, where BA-VQ anneals beta instead. Costs memory (N, K): keep K moderate (2^12 is 4096 codes).
    """
    loss_names = ("commitment_loss", "sample_entropy_loss", "codebook_entropy_loss")
    remedies_note = "whose codebook is the implicit set of sign vectors"

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 lfq_entropy_cost: float = 0.1, lfq_diversity_gamma: float = 1.0, lfq_inv_temperature: float = 100.0):
        super().__init__()
        self._sign_codes(num_embeddings, embedding_dim)
        self.commitment_cost, self.entropy_cost = commitment_cost, lfq_entropy_cost
        self.diversity_gamma, self.inv_temperature = lfq_diversity_gamma, lfq_inv_temperature

    def _sign_codes(self, num_embeddings: int, embedding_dim: int) -> None:
        """What LFQ and BSQ share: d = log2 K bits, the projections D -> d -> D and the implicit codebook."""
        d = num_embeddings.bit_length() - 1       # K = 2^d (config_problems)
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, d
        self.proj_in = nn.Linear(embedding_dim, d)
        self.proj_out = nn.Linear(d, embedding_dim)
        self.register_buffer("basis", 2 ** torch.arange(d))                                 # (d,) 1, 2, 4, ...
        self.register_buffer("codes", sign_patterns(d))                                     # c_k in {-1, +1}^d

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        K = cfg.codebook_size
        if K < 2 or K & (K - 1):
            return [f"lfq needs codebook_size to be a power of two (got {K}; e.g. 512 = 2^9)"]
        return []

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.codes[indices]).permute(0, 3, 1, 2)             # (B, H, W) -> (B, D, H, W)

    def rate_distortion_source(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections h (N, d) and the sign vectors {-1, +1}^d (the sign of h is the nearest one)."""
        return self.proj_in(_flatten_latents(z)), self.codes

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = _flatten_latents(z)                                  # (N, D)
            h = self.proj_in(z_flat)                                      # (N, d)
            q = torch.where(h > 0, 1.0, -1.0)                             # (N, d), sign
            indices = ((h > 0).long() * self.basis).sum(1)                # (N,)
            log_p = (2.0 * self.inv_temperature * h @ self.codes.t()).log_softmax(1)   # (N, K)
            sample_h = -(log_p.exp() * log_p).sum(1).mean()                # E_x H(p(.|x))
            log_avg = log_p.logsumexp(0) - math.log(log_p.shape[0])        # (K,), log E_x p(k|x)
            codebook_h = -(log_avg.exp() * log_avg).sum()                  # H(E_x p)
            losses = {"commitment_loss": self.commitment_cost * F.mse_loss(h, q),
                      "sample_entropy_loss": self.entropy_cost * sample_h,
                      "codebook_entropy_loss": -self.entropy_cost * self.diversity_gamma * codebook_h}
            z_q = _unflatten_latents(self.proj_out(straight_through(h, q)), z.shape)   # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **_code_stats(indices, self.num_embeddings)}
        return z_q, losses, info


def gaussian_w2(feats: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Wasserstein VQ's distribution term (their calc_wasserstein_loss): W2 (not squared) between Gaussians fitted to
    ``feats`` (N, D), held constant, and to ``codes`` (K, D), which get the gradient. Both are divided by s = the
    largest unbiased per-dimension std of feats (+ 1e-8); means and unbiased covariances; with S_z^1/2 from eigh,

        W2 = sqrt( |mu_z - mu_c|^2 + relu(tr S_z + tr S_c - 2 sum_i sqrt(relu(l_i) + 1e-8)) + 1e-10 ),
        l = the eigenvalues of S_z^1/2 S_c S_z^1/2,

    with their guards (relu and 1e-8 inside both square roots, non-finite entries zeroed); computed in float64 (in
    float32 the eigendecompositions' last bits depend on memory layout) and returned in the codes' dtype."""
    dtype = codes.dtype
    z, codes = feats.detach().double(), codes.double()                 # float64: eigh's rounding is not to decide
    s = z.std(dim=0).max() + 1e-8
    z = z / s
    mu_z, zc = z.mean(0), z - z.mean(0, keepdim=True)
    S_z = zc.t() @ zc / (z.shape[0] - 1)                                              # (D, D)
    c = codes / s
    mu_c, cc = c.mean(0), c - c.mean(0, keepdim=True)
    S_c = cc.t() @ cc / (c.shape[0] - 1)                                              # (D, D), with gradient
    finite = lambda x: torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    lam, V = torch.linalg.eigh(S_z)
    root = finite(V @ torch.diag(torch.sqrt(F.relu(lam) + 1e-8)) @ V.t())            # S_z^1/2, constant
    M = finite(finite(root @ S_c) @ root)
    cross = torch.sqrt(F.relu(torch.linalg.eigvalsh(M)) + 1e-8).sum()
    cov = F.relu(torch.trace(S_z) + torch.trace(S_c) - 2.0 * cross)
    return torch.sqrt((mu_z - mu_c).pow(2).sum() + cov + 1e-10).to(dtype)


class WassersteinVQQuantizer(TableQuantizer):
    """Wasserstein VQ (arXiv 2506.15078: the codebook's distribution matched to the features') as the authors' code (VQ-Research/
    Wasserstein-VQ, code/VQVAE/model/wasserstein_quantizer.py) with the values of their training scripts (their
    config.py defaults the distribution term's weight to 0, which turns the method off). Nearest code by squared
    distance and the straight-through estimator, with

        loss = commitment_cost * mse(z, sg[e]) + codebook_cost * mse(sg[z], e) + wvq_gamma * W2(queue, codebook)

    (0.1, 1 and 0.5: their beta is the commitment weight and alpha the codebook's, the other way round from their
    help text), W2 = ``gaussian_w2`` between Gaussians fitted to a FIFO of the last ``wvq_queue`` encoder outputs
    (65536, filled with 0.01 N(0, 1) at the start; the batch is written into it before the loss, detached) and to the
    whole codebook, so every code gets that gradient and the encoder none. Codebook N(0, 0.01^2), trained in an
    optimizer group of its own at ``wvq_codebook_lr`` (their Adam at 0.02, unscheduled) without weight decay.
    Evaluation: the nearest code; the W2 term is of the batch alone and the queue is left as it is. A write that
    runs past the queue's end wraps around (theirs asserts that the batch divides the queue).
    """
    loss_names = ("commitment_loss", "codebook_loss", "wasserstein_loss")
    remedies_note = "which has its authors' own codebook initialisation and its distribution-matching term"

    @classmethod
    def complete_config(cls, given: dict) -> dict:
        """Their scripts' weights where the shared fields were not given: commitment 0.1, codebook 1."""
        return {"commitment_cost": 0.1, "codebook_cost": 1.0, **given}

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.1,
                 codebook_cost: float = 1.0, wvq_gamma: float = 0.5, wvq_queue: int = 65536,
                 wvq_codebook_lr: float = 0.02):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.codebook_cost, self.gamma = commitment_cost, codebook_cost, wvq_gamma
        self.codebook_lr = wvq_codebook_lr
        self.codebook = nn.Parameter(torch.randn(num_embeddings, embedding_dim) * 0.01)   # (K, D), N(0, 0.01^2)
        self.register_buffer("queue", torch.randn(wvq_queue, embedding_dim) * 0.01)       # (Q, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def optimizer_groups(self) -> list:
        if self.codebook_lr <= 0:
            return []
        return [{"name": "wasserstein_vq_codebook", "params": [self.codebook], "lr": self.codebook_lr,
                 "weight_decay": 0.0}]

    @torch.no_grad()
    def _enqueue(self, z_flat: torch.Tensor) -> None:
        Q, n = self.queue.shape[0], z_flat.shape[0]
        rows = (self.queue_ptr + torch.arange(n, device=z_flat.device)) % Q            # (n,), wraps at the end
        if n > Q:                                                                       # only the last Q fit
            rows, z_flat = rows[-Q:], z_flat[-Q:]
        self.queue[rows] = z_flat.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % Q)

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = _flatten_latents(z)                                  # (N, D)
            E = at_least_f32(self.codebook)                               # (K, D)
            if self.training:
                self._enqueue(z_flat.detach())                            # before the loss: this batch counts
            with torch.no_grad():
                indices = squared_distances(z_flat, E).argmin(dim=1)      # (N,)
            e = F.embedding(indices, E)                                   # (N, D), differentiable in the codebook
            w2 = gaussian_w2(self.queue if self.training else z_flat, E)
            losses = {"commitment_loss": self.commitment_cost * F.mse_loss(z_flat, e.detach()),
                      "codebook_loss": self.codebook_cost * F.mse_loss(z_flat.detach(), e),
                      "wasserstein_loss": self.gamma * w2}
            z_q = _unflatten_latents(straight_through(z_flat, e.detach()), z.shape)   # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **_code_stats(indices, self.num_embeddings)}
        return z_q, losses, info


class NSVQQuantizer(TableQuantizer):
    """NSVQ, "Beyond Stationarity" (arXiv 2602.18896): every code is pulled toward the latents near it, not only the
    winner, with a kernel whose bandwidth shrinks over training. As the paper and its CelebA-HQ code (CAIR-LAB-WFUSM/
    NS-VQ-TransVQ, the vq_vae.py class the paper's runs use; the ImageNet file's VectorQuantizer2_with_soft_dist skips
    its soft branch whenever an epoch is passed, as its training always does, and reads an unset attribute: see
    docs/method.md, "NSVQ"). Nearest code k* by squared distance d (summed over D); codebook-loss weights, held
    constant (sg),

        c_k(x) = 1 for k = k*(x),   min(1, w K softmax_k(-d(x, k) / tau)) otherwise   (w = ``nsvq_weight``, 0.01)
        codebook_loss   = codebook_cost * (1/N) sum_x sum_k c_k(x) mean_D (sg[x] - e_k)^2     (1)
        commitment_loss = commitment_cost * mse(x, sg[e_k*])                               (0.25)

    (the weights are not normalised: the winner's part is VQ's codebook term), tau = ``nsvq_tau`` x
    ``nsvq_tau_decay`` ^ epoch (1 x 0.5^epoch, floor 1e-8; the epoch of quantized training). Their straight-through
    line z + a e + sg[(1 - a) e - z], a = 2 ``nsvq_code_gradient`` / (N D), gives the decoder the code and the chosen
    codes a times its gradient besides the loss's. Evaluation: the nearest code; the codebook term of the winner
    alone (their validation). Unlike BA-VQ's soft codebook update, the weights here only spread the codebook
    *loss*: the assignment stays hard, the decoder sees the winner, and the rate is that of the hard codes.
    """
    loss_names = ("commitment_loss", "codebook_loss")
    remedies_note = "which pulls every code toward the latents near it by its own kernel"

    @classmethod
    def complete_config(cls, given: dict) -> dict:
        """The paper's loss weights where the shared fields were not given: commitment 0.25, codebook 1."""
        return {"commitment_cost": 0.25, "codebook_cost": 1.0, **given}

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 codebook_cost: float = 1.0, nsvq_weight: float = 0.01, nsvq_tau: float = 1.0,
                 nsvq_tau_decay: float = 0.5, nsvq_code_gradient: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.codebook_cost = commitment_cost, codebook_cost
        self.weight, self.tau0, self.decay, self.alpha = nsvq_weight, nsvq_tau, nsvq_tau_decay, nsvq_code_gradient
        self.tau = nsvq_tau
        self.codebook = nn.Parameter(init_codebook(num_embeddings, embedding_dim, "uniform"))   # (K, D), U[-1/K, 1/K] as theirs

    def set_schedule(self, t: float, step: int = 0) -> None:
        epoch = step // self.steps_per_epoch if self.steps_per_epoch > 0 else 0
        self.tau = max(self.tau0 * self.decay ** epoch, 1e-8)

    def extra_metrics(self) -> dict:
        return {"nsvq_tau": self.tau}

    def weights(self, d: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """c (N, K): 1 at the winner, min(1, w K softmax(-d / tau)) elsewhere, no gradient."""
        K = d.shape[1]
        soft = (self.weight * K) * torch.softmax(-d.detach() / self.tau, dim=1)
        one_hot = F.one_hot(indices, K).to(d.dtype)
        return (soft * (1 - one_hot) + one_hot).clamp(0.0, 1.0)

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            x = _flatten_latents(z)                                       # (N, D)
            E = at_least_f32(self.codebook)                               # (K, D)
            d = squared_distances(x.detach(), E.detach())                 # (N, K)
            indices = d.argmin(dim=1)                                     # (N,)
            e = F.embedding(indices, E)                                   # (N, D)
            if self.training:
                c = self.weights(d, indices)                              # (N, K)
                xs = x.detach()
                # (1/(N D)) sum_x sum_k c (|x|^2 - 2 x.e_k + |e_k|^2), without the (N, K, D) differences
                codebook = ((c.sum(1) * xs.pow(2).sum(1)).sum() - 2.0 * (E * (c.t() @ xs)).sum()
                            + (c.sum(0) * E.pow(2).sum(1)).sum()) / xs.numel()
                a = 2.0 * self.alpha / x.numel()
                z_q_flat = x + a * e + ((1.0 - a) * e - x).detach()       # value e; the codes get a x the gradient
            else:
                codebook = F.mse_loss(x.detach(), e)
                z_q_flat = straight_through(x, e.detach())
            losses = {"commitment_loss": self.commitment_cost * F.mse_loss(x, e.detach()),
                      "codebook_loss": self.codebook_cost * codebook}
            z_q = _unflatten_latents(z_q_flat, z.shape)                   # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **_code_stats(indices, self.num_embeddings)}
        return z_q, losses, info


class BSQQuantizer(LFQQuantizer):
    """Binary spherical quantization (Zhao, Xiong & Kraehenbuehl 2024, "Image and Video Tokenization with Binary
    Spherical Quantization", arXiv 2406.07548) as the authors' code (zhaoyue-zephyrus/bsq-vit,
    transcoder/models/quantizer/bsq.py with transcoder/models/bsqvit.py) under their image-tokenizer configs. LFQ's
    projections and implicit codebook (shared), with the latent on the unit sphere:

        u = h / |h|,  h = W_in z + b_in (d = log2 K bits);   z_q = (u + sg[sign(u) - u]) / sqrt(d)   (unit norm; the
        straight-through gradient is scaled by 1/sqrt(d) too), decoded by W_out z_q + b_out.

    Entropy penalty, per contiguous group of g = ``bsq_group_size`` bits (g must divide d; 0: g = d, one group, which
    is theirs, 9 bits, at K = 512), p_g = softmax over the
    2^g sign patterns c of 2 tau <u_g, c> / sqrt(d) (tau = ``bsq_inv_temperature``), H(p) = -sum p ln(p + 1e-8):

        sample_entropy_loss   =  w / tau * mean_x sum_g H(p_g(x))
        codebook_entropy_loss = -w / tau * gamma * sum_g H(mean_x p_g(x))      (gamma = ``bsq_diversity_gamma``)
        commitment_loss       =  w * commitment_cost * mean_x sum_i (sg[z_q] - u)_i^2   (their beta: 0)

    (their criterion weights the quantizer's whole loss by w), w ramps linearly from ``bsq_entropy_cost_start`` (0.3) to ``bsq_entropy_cost`` (0.1) over
    ``bsq_entropy_rampup_steps`` (2000) quantized steps: their criterion's codebook_weight x (r + 3 (1 - r)). With g = d
    the entropies are LFQ's exactly (beta_LFQ = tau / sqrt(d), on u); with smaller groups the codebook entropy is a sum
    over groups, an upper bound on the whole code's. Indices are LFQ's (least significant bit first; theirs is most
    significant first, a relabelling). docs/method.md ("BSQ") lists where their configs' 'analytical' mode differs.
    """
    remedies_note = "whose codebook is the implicit set of sign vectors on the sphere"

    @classmethod
    def complete_config(cls, given: dict) -> dict:
        """Their commitment weight where the shared field was not given: 0 (beta = 0 in every config)."""
        return {"commitment_cost": 0.0, **given}

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        problems = LFQQuantizer.config_problems.__func__(cls, cfg)
        K = cfg.codebook_size
        if not problems and cfg.bsq_group_size and (K.bit_length() - 1) % cfg.bsq_group_size:
            d = K.bit_length() - 1
            ok = [g for g in range(1, d + 1) if d % g == 0]
            problems.append(f"bsq_group_size {cfg.bsq_group_size} must divide the bits log2 K = {d} (K = {K}); "
                            f"choose one of {', '.join(map(str, ok))}")
        return problems

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.0, bsq_group_size: int = 0,
                 bsq_inv_temperature: float = 1.0, bsq_entropy_cost: float = 0.1, bsq_entropy_cost_start: float = 0.3,
                 bsq_entropy_rampup_steps: int = 2000, bsq_diversity_gamma: float = 1.0):
        Quantizer.__init__(self)
        self._sign_codes(num_embeddings, embedding_dim)
        self.commitment_cost, self.inv_temperature = commitment_cost, bsq_inv_temperature
        self.group_size = bsq_group_size or self.bits                   # 0: one group of every bit
        self.entropy_cost, self.entropy_start, self.rampup = bsq_entropy_cost, bsq_entropy_cost_start, bsq_entropy_rampup_steps
        self.diversity_gamma = bsq_diversity_gamma
        self.entropy_weight = bsq_entropy_cost_start if bsq_entropy_rampup_steps > 0 else bsq_entropy_cost
        self.register_buffer("group_codes", sign_patterns(self.group_size))             # (2^g, g)

    def set_schedule(self, t: float, step: int = 0) -> None:
        r = min(step, self.rampup) / self.rampup if self.rampup > 0 else 1.0
        self.entropy_weight = self.entropy_cost * r + self.entropy_start * (1.0 - r)

    def extra_metrics(self) -> dict:
        return {"bsq_entropy_weight": self.entropy_weight}

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.codes[indices] / math.sqrt(self.bits)).permute(0, 3, 1, 2)   # (B, D, H, W)

    def rate_distortion_source(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit latents u (N, d) and the sign vectors / sqrt(d) (the sign of u is the nearest one)."""
        return F.normalize(self.proj_in(_flatten_latents(z)), dim=1), self.codes / math.sqrt(self.bits)

    def entropies(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean_x sum_g H(p_g(x)), sum_g H(mean_x p_g(x))) in nats for the unit latents u (N, d)."""
        g = self.group_size
        logits = (2.0 * self.inv_temperature / math.sqrt(self.bits)) * (u.reshape(u.shape[0], -1, g) @ self.group_codes.t())
        p = logits.softmax(-1)                                            # (N, G, 2^g)
        sample_h = -(p * torch.log(p + 1e-8)).sum(-1).sum(-1).mean()
        avg = p.mean(0)                                                   # (G, 2^g)
        return sample_h, -(avg * torch.log(avg + 1e-8)).sum()

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            u = F.normalize(self.proj_in(_flatten_latents(z)), dim=1)      # (N, d), on the unit sphere
            q = straight_through(u, torch.where(u > 0, 1.0, -1.0)) / math.sqrt(self.bits)   # (N, d), unit norm
            indices = ((u > 0).long() * self.basis).sum(1)                # (N,)
            sample_h, codebook_h = self.entropies(u)
            w = self.entropy_weight / self.inv_temperature
            losses = {"commitment_loss": self.entropy_weight * self.commitment_cost * (q.detach() - u).pow(2).sum(1).mean(),
                      "sample_entropy_loss": w * sample_h,
                      "codebook_entropy_loss": -w * self.diversity_gamma * codebook_h}
            z_q = _unflatten_latents(self.proj_out(q), z.shape)            # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **_code_stats(indices, self.num_embeddings)}
        return z_q, losses, info


class DiVeQQuantizer(TableQuantizer):
    """DiVeQ (Vali, Baeckstroem & Solin, "DiVeQ: Differentiable Vector Quantization Using the Reparameterization
    Trick", ICLR 2026, arXiv 2509.26469) as the authors' code (AaltoML/DiVeQ, vqvae_compression/diveq.py, class DIVEQ,
    with the class defaults that their scripts use). The nearest code c (squared distance) is reached along a noisy
    direction whose length carries the gradient:

        z_q = z + |c - z| sg[ (c - z + sigma n) / max(|c - z + sigma n|, 1e-12) ],   n ~ N(0, I) (the global RNG)

    (``diveq_sigma`` = their noise_var, which torch.distributions.Normal takes as the std: 1e-3). The encoder gets
    g - (g.u) e and the code (g.u) e (g the decoder's gradient, e the unit error, u the noisy direction); there is no
    commitment or codebook loss. In training z_q is the code up to the noise; evaluation gives the code itself.
    Codebook U[0, 1/K) (their uniform_init) learned by gradient. Replacement, in training only (their forward has no
    gate; they call it only in training): each forward counts every code it used once (not per latent); every
    ``diveq_replace_every`` forwards the codes used in fewer than ``diveq_discard_threshold`` x that many become copies
    of used codes drawn with probability proportional to their counts, plus ``diveq_perturbation`` x N(0, I); the
    counts restart (the optimizer's moments of the rows are kept, as theirs). SF-DiVeQ decodes points between codes, not
    one of K, so it is not here (docs/method.md, "DiVeQ").
    """
    remedies_note = "which has its authors' own codebook initialisation and replacement rule"

    def __init__(self, num_embeddings: int, embedding_dim: int, diveq_sigma: float = 1e-3, diveq_replace_every: int = 100,
                 diveq_discard_threshold: float = 0.01, diveq_perturbation: float = 1e-9):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sigma, self.every, self.threshold, self.perturbation = (diveq_sigma, diveq_replace_every,
                                                                     diveq_discard_threshold, diveq_perturbation)
        self.codebook = nn.Parameter(torch.rand(num_embeddings, embedding_dim) / num_embeddings)   # (K, D) U[0, 1/K)
        self.register_buffer("usage", torch.zeros(num_embeddings))      # forwards that used each code, this window
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))   # training forwards so far
        self._forwards = None                                           # a host copy (read once, not every step)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_forwards", None))

    @torch.no_grad()
    def replace_unused(self, draws: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Their _replace_unused_entries: the (K,) bool mask of the codes replaced. ``draws`` (n_unused,) and ``noise``
        (n_unused, D) default to torch.multinomial over the used codes' counts and torch.randn."""
        used = self.usage / self.every >= self.threshold                  # (K,)
        unused = ~used
        if unused.any() and used.any():
            idx = unused.nonzero().squeeze(1)
            if draws is None:
                draws = torch.multinomial(self.usage * used, idx.numel(), replacement=True)
            if noise is None:
                noise = torch.randn(idx.numel(), self.embedding_dim, device=self.codebook.device)
            self.codebook[idx] = self.codebook[draws] + self.perturbation * noise.to(self.codebook.dtype)
        else:
            unused = torch.zeros_like(unused)
        self.usage.zero_()
        return unused

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = _flatten_latents(z)                                  # (N, D)
            E = at_least_f32(self.codebook)                               # (K, D)
            with torch.no_grad():
                indices = squared_distances(z_flat, E).argmin(dim=1)      # (N,)
            c = F.embedding(indices, E)                                   # (N, D), differentiable in the codebook
                                                                          # (F.embedding: a deterministic backward)
            stats = _code_stats(indices, self.num_embeddings)
            if self.training:
                error = c - z_flat                                        # (N, D)
                noisy = error.detach() + self.sigma * torch.randn_like(z_flat)
                direction = noisy / noisy.norm(dim=1, keepdim=True).clamp_min(1e-12)
                z_q_flat = z_flat + error.norm(dim=1, keepdim=True) * direction
                self._count(stats["code_counts"])
            else:
                z_q_flat = c
            z_q = _unflatten_latents(z_q_flat, z.shape)                   # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **stats}
        return z_q, {}, info

    @torch.no_grad()
    def _count(self, counts: torch.Tensor) -> None:
        """Usage (once per forward per code used) and, every ``diveq_replace_every`` forwards, the replacement."""
        self.usage += (counts > 0).to(self.usage.dtype)
        self.forwards += 1
        if self._forwards is None:
            self._forwards = int(self.forwards) - 1
        self._forwards += 1
        if self.every > 0 and self._forwards % self.every == 0:
            self.replace_unused()


class IBQQuantizer(CodebookQuantizer):
    """Index backpropagation quantization (Shi et al. 2024, "Taming Scalable Visual Tokenizer for
    Autoregressive Image Generation") as the authors' code (TencentARC/SEED-Voken, src/IBQ/modules/vqvae/
    quantize.py, IndexPropagationQuantize and compute_entropy_loss). With logits l = z E^T (dot products,
    temperature 1), P = softmax_k(l) and the code k* = argmax_k l, the decoder gets the straight-through
    one-hot

        y = onehot(k*) - sg[P] + P,   z_q = y E          (forward value e_{k*}; every code gets a gradient
                                                          through P, at every step)
    Loss, their defaults (VQGAN's legacy weighting of the last two terms; ``complete_config``):
        ibq_straight_through_cost * mse(z_q, z)           (1; through y: reaches z and all the codes)
      + commitment_cost * mse(z, sg[e_{k*}])             (1)
      + codebook_cost * mse(sg[z], e_{k*})               (0.25, their beta)
      + ibq_entropy_cost * (H_sample - ibq_diversity_gamma * H_codebook)      (0.05 and 1)
    where, with p = softmax(l / ibq_entropy_temperature) (T = 0.01), H_sample = mean_x H(p(.|x)) and
    H_codebook = -sum_k pbar_k log(pbar_k + 1e-5), pbar = mean_x p (MAGVIT's entropy loss as they wrote it).
    Codebook N(0, 1) (nn.Embedding's default, which their class keeps: ``--init normal`` unless given).
    Evaluation uses the same code k* (their forward has no training branch). The codebook remedies that
    act on a codebook (init, dead-code restarts, cosine) apply; the gradient-codebook ones and
    ``--gradient_estimator`` do not (IBQ is its own estimator).
    """
    loss_names = ("straight_through_loss", "commitment_loss", "codebook_loss", "entropy_loss")

    @classmethod
    def complete_config(cls, given: dict) -> dict:
        """Their defaults where the shared fields were not given: commitment 1, codebook (beta) 0.25, N(0, 1) codes."""
        return {"commitment_cost": 1.0, "codebook_cost": 0.25, "init": "normal", **given}

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        used = remedies_in_use(cfg, GRADIENT_CODEBOOK_REMEDIES + ("gradient_estimator",))
        if used:
            return [f"{_they(used, 'does', 'do')} not apply to ibq, whose straight-through one-hot is its own "
                    f"gradient estimator; drop {'it' if len(used) == 1 else 'them'}"]
        return []

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 1.0,
                 codebook_cost: float = 0.25, decay: float = 0.99, init: str = "normal", cosine: bool = False,
                 dead_code_threshold: float = 0.0, ibq_straight_through_cost: float = 1.0,
                 ibq_entropy_cost: float = 0.05, ibq_entropy_temperature: float = 0.01, ibq_diversity_gamma: float = 1.0):
        super().__init__()
        codebook = self._setup(num_embeddings, embedding_dim, init, cosine, "ste", dead_code_threshold, decay)
        self.codebook = nn.Parameter(codebook)                           # E, (K, D)
        self.register_buffer("usage", torch.zeros(num_embeddings))       # EMA assignments per step (K,)
        self.commitment_cost, self.codebook_cost = commitment_cost, codebook_cost
        self.st_cost, self.entropy_cost = ibq_straight_through_cost, ibq_entropy_cost
        self.entropy_temperature, self.diversity_gamma = ibq_entropy_temperature, ibq_diversity_gamma

    def entropy_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """H_sample - gamma H_codebook of p = softmax(logits / T), logits (N, K) (their compute_entropy_loss)."""
        scaled = logits / self.entropy_temperature
        p, log_p = scaled.softmax(1), scaled.log_softmax(1)                # (N, K)
        sample_h = -(p * log_p).sum(1).mean()
        avg = p.mean(0)                                                     # (K,)
        codebook_h = -(avg * torch.log(avg + 1e-5)).sum()
        return sample_h - self.diversity_gamma * codebook_h

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        with _autocast_off(z.device.type):
            z_flat = self._latents(z)                                     # (N, D)
            E = self._codes()                                             # (K, D)
            logits = z_flat @ E.t()                                       # (N, K), <z, e_k>
            P = logits.softmax(1)
            indices = logits.argmax(1)                                    # (N,), as argmax P
            # y E = onehot E + (P - sg[P]) E: the hard code (differentiable in E) plus a zero-valued soft
            # path whose gradient reaches z and E through P only ((P - sg[P]) is zero, so its E factor is not)
            e = F.embedding(indices, E)                                   # (N, D)
            z_q_flat = e + (P - P.detach()) @ E                           # (N, D)
            stats = _code_stats(indices, self.num_embeddings)
            if self.training:
                self._track(z_flat, stats["code_counts"])
            losses = {"straight_through_loss": self.st_cost * F.mse_loss(z_q_flat, z_flat),
                      "commitment_loss": self.commitment_cost * F.mse_loss(z_flat, e.detach()),
                      "codebook_loss": self.codebook_cost * F.mse_loss(e, z_flat.detach()),
                      "entropy_loss": self.entropy_cost * self.entropy_loss(logits)}
            z_q = _unflatten_latents(z_q_flat, z.shape)                   # (B, D, H, W)
        info = {"code_indices": indices.reshape(B, H, W), **stats}
        return z_q, losses, info


def encodec_sample_vectors(x: torch.Tensor, K: int) -> torch.Tensor:
    """encodec's sample_vectors: K rows of x (N, D) drawn from the global RNG without replacement (with
    replacement when N < K)."""
    N = x.shape[0]
    return x[torch.randperm(N, device=x.device)[:K] if N >= K else torch.randint(0, N, (K,), device=x.device)]


def encodec_kmeans(x: torch.Tensor, K: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """encodec's k-means (core_vq.kmeans): K rows of x (N, D) drawn without replacement (with
    replacement when N < K) from the global RNG, then ``iters`` Lloyd iterations on squared
    Euclidean distances; an empty cluster keeps its centre. Returns (centres (K, D), the cluster
    sizes of the *last assignment*, made before the last centre update). A different algorithm from
    ``kmeans_codebook`` (k-means++, re-seeded empty clusters, final sizes): this one is encodec's."""
    c = encodec_sample_vectors(x, K)                                            # (K, D)
    counts = torch.zeros(K, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        assign = squared_distances(x, c).argmin(1)                              # (N,)
        counts = torch.bincount(assign, minlength=K).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    return c, counts


class ResidualVQQuantizer(Quantizer):
    """Residual VQ (Zeghidour et al. 2021, "SoundStream", Sec. 3.3, Algorithm 1; Juang & Gray 1982) as
    encodec implements it (facebookresearch/encodec, quantization/core_vq.py: the public code of
    SoundStream's residual VQ). ``rvq_stages`` S codebooks of K codes quantize the successive residuals,

        r_0 = z,   q_s = r_{s-1} + sg[e_s - r_{s-1}]  (e_s: stage s's nearest code),   r_s = r_{s-1} - q_s,
        z_q = sum_s q_s,   loss = commitment_cost * (1/S) sum_s mse(r_{s-1}, sg[e_s])

    with a straight-through line per stage and residuals that keep their graph (encodec): r_1 = z - q_1
    has zero gradient, so the decoder's gradient reaches the encoder exactly once (dz_q/dz = I) and only
    stage 1's commitment term reaches it; the loss is the *mean* over stages (encodec's
    ResidualVectorQuantizer). Defaults are encodec's: commitment_cost 1 and Sonnet-style "copy" EMA
    smoothing (``complete_config``), decay 0.99, eps 1e-5.
    Each stage is a VQ-EMA codebook (``VQEMAQuantizer``'s buffers and EMA step) that, in training:
      1. on the first training batch, with ``rvq_kmeans_iters`` > 0, is set by ``encodec_kmeans`` of
         the residuals it sees (encodec: 50 iterations), EMA counts = the cluster sizes and, with
         ``rvq_codebook`` encodec, EMA sums = the centroids themselves (encodec's code, so the first
         EMA updates divide the codes by about their counts: lucidrains/vector-quantize-pytorch #66);
         ``fixed``: sums = count x centroid;
      2. assigns its nearest codes with the codebook as it was before this step;
      3. with ``rvq_dead_code_threshold`` T > 0, replaces the codes whose EMA count is below T by
         vectors of the batch (drawn as encodec's sample_vectors); ``encodec``: in the codebook only, so
         the EMA update of step 4 overwrites them (encodec's code: the replacement has no lasting effect,
         encodec issue #61); ``fixed``: EMA count T and sum T x vector as well, so the code stays;
      4. makes its EMA update on the residuals it sees.
    The library's codebook remedies act on every stage: ``--init`` (normal, unit_sphere; kmeans/data
    from the encoder's outputs, stage by stage on the residuals, with ``rvq_kmeans_iters`` 0),
    ``--dead_code_threshold`` / ``--dead_code_every`` (restarts from the training loop, EMA reset),
    ``--gradient_estimator`` (per stage). lucidrains' ResidualVQ differs: residuals of detached codes,
    so with a straight-through line per stage the encoder gets S times the decoder's gradient; no
    k-means and no dead codes by default; decay 0.8 (docs/method.md, "Residual VQ").
    Codes: ``code_indices`` is (B, S, H, W); the histogram covers all S x K codes, stage s owning
    indices [s K, (s+1) K), so perplexity and usage_rate are over the S x K (stage, code) pairs;
    ``histogram_metrics`` adds each stage's perplexity and usage and puts the rate at the sum of the
    stages' code entropies; validation adds the combined code (the tuple of S indices):
    ``combined_codes`` (distinct tuples used), ``combined_perplexity`` and its entropy in bits.
    """
    loss_names = ("commitment_loss",)
    has_codebook = True
    alphabet_note = ("residual VQ reproduces a latent by a sum of one code per stage, an alphabet of K^S vectors "
                     "(every tuple of stage codes) that is not enumerated")

    @classmethod
    def complete_config(cls, given: dict) -> dict:
        """encodec's defaults where the shared fields were not given: commitment weight 1, and EMA
        counts smoothed in a copy (its laplace_smoothing leaves the cluster sizes raw)."""
        return {"commitment_cost": 1.0, "ema_smoothing": "copy", **given}

    @classmethod
    def config_problems(cls, cfg: Config) -> list:
        problems = []
        used = remedies_in_use(cfg, GRADIENT_CODEBOOK_REMEDIES + ("cosine",))
        if used:
            why = " (cosine would normalise the residuals, which then no longer sum to z)" if "cosine" in used else ""
            problems.append(f"{_they(used, 'does', 'do')} not apply to rvq, whose stages are VQ-EMA codebooks of "
                            f"residuals{why}; drop {'it' if len(used) == 1 else 'them'}")
        if cfg.init in DATA_INITS and cfg.rvq_kmeans_iters > 0:
            problems.append(f"--init {cfg.init} and rvq_kmeans_iters {cfg.rvq_kmeans_iters} both initialise the "
                            "stages from data; choose one (--rvq_kmeans_iters 0 to use --init)")
        return problems

    def __init__(self, num_embeddings: int, embedding_dim: int, rvq_stages: int = 8, commitment_cost: float = 1.0,
                 decay: float = 0.99, epsilon: float = 1e-5, ema_init_count: float = 0.0,
                 ema_smoothing: str = "copy", init: str = "uniform", gradient_estimator: str = "ste",
                 dead_code_threshold: float = 0.0, rvq_kmeans_iters: int = 50, rvq_dead_code_threshold: float = 2.0,
                 rvq_codebook: str = "encodec", rvq_expiry_draw: str = "always"):
        super().__init__()
        self.codes_per_stage, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings = rvq_stages * num_embeddings                       # histogram size, S x K
        self.codes_per_position = rvq_stages
        self.commitment_cost, self.cosine = commitment_cost, False
        self.kmeans_iters, self.expire_threshold, self.fixed = rvq_kmeans_iters, rvq_dead_code_threshold, rvq_codebook == "fixed"
        self.draw_on_expiry = rvq_expiry_draw == "on_expiry"
        self.stages = nn.ModuleList(
            VQEMAQuantizer(num_embeddings, embedding_dim, decay=decay, epsilon=epsilon, init=init,
                           gradient_estimator=gradient_estimator, dead_code_threshold=dead_code_threshold,
                           ema_init_count=ema_init_count, ema_smoothing=ema_smoothing)
            for _ in range(rvq_stages))
        self.register_buffer("kmeans_done", torch.zeros((), dtype=torch.bool))    # encodec's `inited`
        self._kmeans_done = None                           # a host copy of it (read once, not every step)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_kmeans_done", None))

    # --- the codebook hooks of the training loop, stage by stage
    @torch.no_grad()
    def restart_dead_codes(self, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        return torch.cat([stage.restart_dead_codes(optimizer) for stage in self.stages])     # (S K,)

    @torch.no_grad()
    def init_from_latents(self, z_flat: torch.Tensor, fit) -> None:
        """--init kmeans|data: stage s's codes = fit(r_{s-1}) on the residuals of the stages before it."""
        r = z_flat.float()
        for stage in self.stages:
            centers, sizes = fit(r, self.codes_per_stage)
            stage.load_codes(centers, sizes)
            r = r - centers[squared_distances(r, centers).argmin(1)]

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) -> (B, D, H, W): the sum of the stages' codes."""
        return sum(stage.decode_indices(indices[:, s]) for s, stage in enumerate(self.stages))

    def histogram_metrics(self, counts: torch.Tensor, n_images: int) -> dict:
        per_stage = counts.reshape(len(self.stages), self.codes_per_stage)      # (S, K)
        out, bits = {}, 0.0
        for s, c in enumerate(per_stage, 1):
            out[f"stage{s}_perplexity"] = float(perplexity_from_counts(c))
            out[f"stage{s}_usage_rate"] = float(usage_from_counts(c))
            bits += float(entropy_bits(c))
        positions = float(per_stage[0].sum()) / max(n_images, 1)
        return {**out, "code_entropy_bits": bits, "bits_per_image": bits * positions}

    def code_set_metrics(self, indices: torch.Tensor) -> dict:
        """The combined code of each position, the tuple (k_1, .., k_S)."""
        return combined_code_metrics(indices, self.codes_per_stage)

    @torch.no_grad()
    def _kmeans_init(self, stage: VQEMAQuantizer, r: torch.Tensor) -> None:
        """Step 1: encodec's init_embed_ on this stage's residuals r (N, D)."""
        centers, sizes = encodec_kmeans(r, self.codes_per_stage, self.kmeans_iters)
        stage.codebook.copy_(centers)
        stage.ema_cluster_size.copy_(sizes)
        stage.ema_w.copy_(centers * sizes[:, None] if self.fixed else centers)

    @torch.no_grad()
    def _expire(self, stage: VQEMAQuantizer, r: torch.Tensor, any_dead: bool = True) -> None:
        """Step 3: encodec's expire_codes_ (codes with EMA count < T get batch vectors). ``rvq_expiry_draw always``
        draws the batch vectors whether or not a code expired (no host sync; the same codes and EMA, another random
        stream); ``on_expiry`` skips the draw when none did (``any_dead`` False), as encodec's early return."""
        if not any_dead:
            return
        T = self.expire_threshold
        dead = stage.ema_cluster_size < T                                            # (K,)
        new = encodec_sample_vectors(r, self.codes_per_stage)                        # (K, D)
        stage.codebook.copy_(torch.where(dead[:, None], new, stage.codebook))
        if self.fixed:
            stage._reset_ema(dead, new, T)

    def forward(self, z: torch.Tensor):
        B, _, H, W = z.shape
        kmeans_now = False
        if self.training and self.kmeans_iters > 0:
            if self._kmeans_done is None:
                self._kmeans_done = bool(self.kmeans_done)
            kmeans_now = not self._kmeans_done
        expiring = self.training and self.expire_threshold > 0
        any_dead = [True] * len(self.stages)
        if expiring and self.draw_on_expiry and not kmeans_now:  # one host read for every stage: a stage's counts
            any_dead = torch.stack([(s.ema_cluster_size < self.expire_threshold).any()   # change only after its
                                    for s in self.stages]).tolist()                     # own check
        with _autocast_off(z.device.type):
            r = _flatten_latents(at_least_f32(z))                            # r_0 = z, (N, D), N = B*H*W
            total = torch.zeros_like(r)
            commitment, indices, counts = 0.0, [], []
            for s, stage in enumerate(self.stages):
                if kmeans_now:
                    self._kmeans_init(stage, r.detach())
                    if expiring and self.draw_on_expiry:                      # its counts: the k-means bins
                        any_dead[s] = bool((stage.ema_cluster_size < self.expire_threshold).any())
                E = stage._codes()                                            # (K, D), before this step
                idx = squared_distances(r, E).argmin(dim=1)                   # (N,)
                e = E[idx]                                                    # (N, D)
                stats = _code_stats(idx, self.codes_per_stage)
                if self.training:
                    if self.expire_threshold > 0:
                        self._expire(stage, r.detach(), any_dead[s])
                    stage._ema_update(r.detach(), idx, stats["code_counts"])
                    stage._track(r, stats["code_counts"])
                commitment = commitment + F.mse_loss(r, e.detach())
                q = stage._estimate(r, e.detach())                            # r + sg[e - r] (ste)
                r = r - q                                                     # r_s: zero gradient (ste)
                total = total + q
                indices.append(idx.reshape(B, H, W))
                counts.append(stats["code_counts"])
            z_q = _unflatten_latents(total, z.shape)                          # (B, D, H, W)
        if kmeans_now:
            self.kmeans_done.fill_(True)
            self._kmeans_done = True
        counts = torch.cat(counts)                                           # (S K,)
        info = {"code_indices": torch.stack(indices, 1), "code_counts": counts,     # (B, S, H, W)
                "perplexity": perplexity_from_counts(counts), "usage_rate": usage_from_counts(counts)}
        return z_q, {"commitment_loss": self.commitment_cost * commitment / len(self.stages)}, info


QUANTIZERS = {
    "vq_ema": VQEMAQuantizer,
    "vq": VQQuantizer,
    "ba_vq": BAQuantizer,
    "fsq": FSQQuantizer,
    "simvq": SimVQQuantizer,
    "sq_vae": SQVAEQuantizer,
    "lfq": LFQQuantizer,
    "rvq": ResidualVQQuantizer,
    "ibq": IBQQuantizer,
    "ecvq": ECVQQuantizer,
    "optvq": OptVQQuantizer,
    "bsq": BSQQuantizer,
    "wasserstein_vq": WassersteinVQQuantizer,
    "nsvq": NSVQQuantizer,
    "diveq": DiVeQQuantizer,
}


# =============================================================================
# metrics
# =============================================================================


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(H(p)) of the code histogram ``counts`` (K,), H in nats; K for uniform use, 1 for one code.
    Returns a 0-dim float tensor on the counts' device (no host sync)."""
    c = counts.float() if counts.device.type == "mps" else counts.double()   # MPS has no float64
    p = c / c.sum().clamp_min(1.0)
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum()
    return h.exp().float()


def usage_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of the K codes used at least once (0-dim float tensor)."""
    return (counts > 0).float().mean()


def compute_perplexity(code_indices: torch.Tensor, num_embeddings: int) -> float:
    """Perplexity exp(H) of the empirical code distribution of ``code_indices`` (any shape)."""
    return float(perplexity_from_counts(code_histogram(code_indices, num_embeddings)))


def compute_usage_rate(code_indices: torch.Tensor, num_embeddings: int) -> float:
    """Fraction of the K codes that occur at least once in ``code_indices``."""
    return float(usage_from_counts(code_histogram(code_indices, num_embeddings)))


def psnr_per_image(x: torch.Tensor, x_recon: torch.Tensor) -> torch.Tensor:
    """Standard PSNR in dB on the [0, 1] pixel scale, one value per image, for images stored in
    [-1, 1]: mse01 = mean(((x - x_recon) / 2)^2), PSNR = 10 log10(1 / mse01). The reconstruction is
    not clipped. An exact reconstruction (mse 0) is capped at mse01 = 1e-10, i.e. 100 dB."""
    diff = (x.float() - x_recon.float()) / 2.0                                     # [0, 1] scale
    mse01 = diff.pow(2).flatten(1).mean(1).clamp_min(1e-10)                        # (B,)
    return 10.0 * torch.log10(1.0 / mse01)


def compute_psnr(x: torch.Tensor, x_recon: torch.Tensor) -> float:
    """Mean per-image PSNR (dB, [0, 1] scale) of a batch of [-1, 1] images."""
    return float(psnr_per_image(x, x_recon).mean())


def ssim_per_image(x: torch.Tensor, x_recon: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM (Wang et al. 2004, eq. 13) per image, for images stored in [-1, 1]: both mapped to [0, 1]
    (the reconstruction clipped to it), data range 1, C1 = (0.01)^2, C2 = (0.03)^2, local statistics
    under a normalised Gaussian window (11 x 11, sigma 1.5) over every position where the window fits
    ('valid'), the SSIM map averaged over positions and channels. This is scikit-image's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)
    (a test checks it). Float32 at least; (B,) out."""
    a = at_least_f32(x).add(1).div(2)
    b = at_least_f32(x_recon).add(1).div(2).clamp(0, 1)
    C = a.shape[1]
    r = (window - 1) // 2
    g = torch.exp(-(torch.arange(window, dtype=a.dtype, device=a.device) - r) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window)             # (C, 1, 11, 11)

    def blur(t):                                                                 # local weighted mean, per channel
        return F.conv2d(t, kernel, groups=C)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """H of the code histogram ``counts`` (K,) in bits (= log2 of the perplexity), 0-dim float."""
    return perplexity_from_counts(counts).log2()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) (Heusel et al. 2017):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), covariances with N - 1 (as pytorch-fid and
    torchmetrics), in float64; tr (S_a S_b)^(1/2) = sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))) (symmetric)."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.t()), torch.cov(b.t())                          # (F, F)
    w, V = torch.linalg.eigh(cov_a)
    root_a = (V * w.clamp_min(0).sqrt()) @ V.t()                               # S_a^(1/2)
    tr_root = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_root)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 [0, 255] (clipped, rounded), as they would be saved."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)



PAPER_METRICS = ("perplexity_sqvae", "psnr_cvqvae", "ssim_cvqvae")   # the papers' conventions (vqvae_analysis)
EVAL_METRICS = ("psnr", "ssim", "lpips", "fid") + PAPER_METRICS   # psnr, ssim: every validation; lpips, fid:
                                                                    # optional packages; the papers' conventions


# =============================================================================
# training
# =============================================================================

AMP_MODES = declared_choices("amp")
COMPILE_MODES = declared_choices("compile_mode")     # torch.compile modes (--compile_mode)
DATA_PATHS = declared_choices("data_path")


@dataclass
class Runtime:
    """How the loop runs on the device (never what it computes): autocast dtype, gradient scaler
    (fp16), memory format. ``Runtime(device)`` is the plain float32 path."""
    device: torch.device
    amp_dtype: torch.dtype | None = None           # autocast dtype; None = float32
    scaler: object | None = None                   # torch.amp.GradScaler for fp16
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def make_runtime(cfg: Config, device: torch.device) -> Runtime:
    cuda = device.type == "cuda"
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if cuda else "off")
    if amp == "fp16" and not cuda:
        raise BavqError(f"--amp fp16 needs a CUDA GPU (the device is {device}). Use --amp bf16 or --amp off.")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    if dtype is not None and not _autocast_available(device.type):
        raise BavqError(f"--amp {amp} is not supported on {device.type} by this PyTorch ({torch.__version__}). "
                        "Use --amp off, or a newer PyTorch.")
    scaler = None
    if amp == "fp16":
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler") \
            else torch.cuda.amp.GradScaler()
    return Runtime(device, dtype, scaler, channels_last=cfg.channels_last and cuda)


def default_val_batch_size(cfg: Config) -> int:
    """A quantizer whose codes depend on the batch would validate at the training batch size (none
    of the built-in ones: BA-VQ evaluates with its running marginal); the others validate in batches
    of 1024 for speed."""
    if cfg.val_batch_size:
        return cfg.val_batch_size
    return cfg.batch_size if QUANTIZERS[cfg.quantizer].batch_dependent(cfg) else max(cfg.batch_size, 1024)


def build_model(cfg: Config, device: torch.device | None = None) -> VQVAE:
    """The model of ``cfg``, initialised from ``cfg.seed`` exactly as ``train(cfg)`` initialises it."""
    torch.manual_seed(cfg.seed)
    model = VQVAE.from_config(cfg)
    return model.to(device) if device is not None else model


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused CUDA kernel on a GPU (one launch for all parameters)."""
    kwargs = {"fused": True} if device.type == "cuda" else {}
    own = model.quantizer.optimizer_groups()
    taken = {id(p) for g in own for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in taken]
    return torch.optim.AdamW([{"params": rest}, *own] if own else rest, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             **kwargs)


def setup_model(cfg: Config, device: torch.device, rt: Runtime) -> tuple[VQVAE, torch.optim.Optimizer]:
    """The model of ``cfg`` on ``device`` in the runtime's memory format, its optimizer, and
    torch.compile of encoder and decoder (and of the quantizer's own kernels) when asked (in place:
    state_dict keys are unchanged). On CUDA it turns on cuDNN autotuning (the shapes are fixed)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(cfg, device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg, device)
    if cfg.compile:
        model.encoder.compile(mode=cfg.compile_mode)
        model.decoder.compile(mode=cfg.compile_mode)
        model.compiled = True
        model.quantizer.compile_kernels()
    return model, optimizer


@torch.no_grad()
@contextlib.contextmanager
def evaluating(model: nn.Module):
    """The block runs with ``model`` in eval mode and without gradients; its mode is restored after it (also
    when the block raises). Every evaluation uses it (validate, the analysis, the pictures, rFID, LPIPS)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def eval_batches(model: VQVAE, images_u8: torch.Tensor, batch_size: int, rt: Runtime):
    """The loop of every evaluation pass: (start, x) for consecutive batches of ``images_u8``, x (b, 3, 32, 32) on
    the [-1, 1] scale as ``rt`` prepares it, each after the model's ``mark_step`` (CUDA graphs). Use it inside
    ``evaluating(model)``; run the model under ``rt.autocast()``."""
    for start in range(0, images_u8.shape[0], batch_size):
        model.mark_step()
        yield start, rt.prepare(to_float(images_u8[start:start + batch_size]))


def init_from_data(model: VQVAE, images: torch.Tensor, cfg: Config) -> None:
    """--init kmeans | data, before quantized training: the encoder outputs of ``kmeans_batches``
    training batches (a random draw seeded by ``cfg.seed``, separate from the data order); kmeans:
    k-means++ and ``kmeans_iters`` Lloyd iterations; data: K of them drawn at random (the classifier
    collapse report's init). Loads the centres as the codebook with usage = cluster size per batch
    (for VQ-EMA: EMA counts = that, EMA sums = count x code)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = min(images.shape[0], cfg.kmeans_batches * cfg.batch_size)
    idx = torch.randperm(images.shape[0], generator=g)[:n].to(images.device)
    device = next(model.parameters()).device
    zs = []
    with evaluating(model):
        for s in range(0, n, cfg.batch_size):
            model.mark_step()              # clone: with CUDA graphs the next call may reuse the output's memory
            zs.append(_flatten_latents(model.encoder(to_float(images[idx[s:s + cfg.batch_size]].to(device)))).clone())
    z = torch.cat(zs)                                                          # (n*H*W, D)
    q = model.quantizer
    kmeans = cfg.init == "kmeans"

    def fit(x: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:      # (centres, counts per step)
        centers, sizes = kmeans_codebook(x, K, cfg.kmeans_iters if kmeans else 0, generator=g, cosine=q.cosine,
                                         seeding="kmeans++" if kmeans else "random")
        return centers, sizes / (n / cfg.batch_size)
    q.init_from_latents(z, fit)


def _batches(images: torch.Tensor, perm: torch.Tensor, start: int, B: int, cfg: Config, device):
    """Training batches in the order of ``perm`` from batch ``start`` on, as uint8 on the device.
    data_path 'device': index the resident tensor; 'loader': a DataLoader over the same order."""
    n_steps = math.ceil(images.shape[0] / B)
    if cfg.data_path == "device":
        for i in range(start, n_steps):
            yield images[perm[i * B:(i + 1) * B]]
        return
    ds = torch.utils.data.TensorDataset(images.cpu())
    order = perm[start * B:].tolist()
    loader = torch.utils.data.DataLoader(ds, batch_size=B, sampler=order, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator())   # never draws from the global RNG
    for (xb,) in loader:
        yield xb.to(device, non_blocking=True)


def train_epoch(model: VQVAE, optimizer: torch.optim.Optimizer, images: torch.Tensor, cfg: Config,
                generator: torch.Generator, step: int, total_steps: int, desc: str = "train",
                resume_from: dict | None = None, should_stop=None, rt: Runtime | None = None,
                after_backward=None, guard: "LossGuard | None" = None,
                model_ema: ModelEMA | None = None) -> tuple[dict, int]:
    """One pass over ``images`` (uint8, on the model's device, or on the CPU with data_path loader)
    in the order of one ``randperm`` drawn from ``generator``. Returns (metrics, new global step).

    Per step: loss = recon_loss + w * sum(quantizer losses), w = min(1, step / warm-up steps);
    backward; optional gradient clipping; AdamW; every ``dead_code_every`` steps dead codes are
    restarted (and their Adam moments reset); with ``--init kmeans|data`` the codebook is computed from
    encoder outputs (``init_from_data``) just before the first quantized step. With ``pretrain_epochs``
    E, the first E epochs' steps bypass the quantizer (w = 0, no restarts) and the quantizer's step
    count, schedule, data init and warm-up start after them. Metrics (see ``_EpochStats.metrics``) are
    accumulated on the device and read once at the end; non-finite values and loss explosions
    (``LossGuard``: a step's recon_loss over ``explode_factor`` x its window minimum) are checked every
    ``min(progress_every, explode_window)`` steps, with the same host sync. ``guard`` carries the
    explosion window over epochs (the caller keeps one per run); None: a fresh window this epoch.

    Hooks for whoever runs the loop (the experiment module uses them; both default to nothing):
    ``should_stop()`` is polled before each batch (it should be a Python flag, no device sync); when it
    is true, ``StopRequested`` carries what ``resume_from`` needs to finish the epoch exactly as if it
    had not stopped. ``after_backward(model)`` runs between backward and gradient clipping (e.g. an
    all-reduce of the gradients over processes). ``model_ema`` (``ModelEMA``) is updated after every step.
    """
    model.train()
    device = next(model.parameters()).device
    rt = rt or Runtime(device)
    q = model.quantizer
    n_steps = math.ceil(images.shape[0] / cfg.batch_size)
    q.steps_per_epoch = n_steps
    warmup_steps = cfg.vq_loss_warmup_epochs * n_steps
    q_start = cfg.pretrain_epochs * n_steps                               # the first quantized step
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    restarts_on = cfg.dead_code_threshold > 0
    data_init = cfg.init in DATA_INITS
    guard = guard or LossGuard(cfg.explode_factor, cfg.explode_window, device)
    stats = _EpochStats(q.num_embeddings, device, generator, resume_from, guard)
    check_every = min(cfg.progress_every, cfg.explode_window)
    perm = torch.randperm(images.shape[0], generator=generator).to(device)
    bar = _ProgressBar(n_steps, desc, cfg.progress, initial=stats.start)
    batches = _batches(images, perm, stats.start, cfg.batch_size, cfg, device)
    w = 1.0
    for i in range(stats.start, n_steps):
        if should_stop is not None and should_stop():
            stats.check(bar)                                              # never checkpoint a diverged state
            raise StopRequested(stats.state(i), step)
        x = rt.prepare(to_float(next(batches)))                           # (b, 3, 32, 32) in [-1, 1]
        qs = step - q_start                                               # quantized steps so far (< 0: stage 1)
        model.bypass_quantizer = qs < 0
        if qs == 0 and data_init:                                         # --init kmeans|data, from the encoder
            init_from_data(model, images, cfg)                            # as trained so far (none: at step 0)
        if qs == 0:
            guard.reset()                                                 # the decoder now sees codes
        q.set_schedule(max(qs, 0) / max(total_steps - q_start - 1, 1), max(qs, 0))
        model.mark_step()
        with rt.autocast():
            x_recon, recon_loss, loss_dict, info = model(x)
        w = _loss_weight(qs, warmup_steps)                                # warm-up; 0 while bypassed
        loss = q.reconstruction_objective(recon_loss) + w * sum(loss_dict.values())
        grad_norm = _backward_and_step(loss, model, optimizer, rt, clip, after_backward)  # norm before clipping
        if restarts_on and qs >= 0 and (qs + 1) % cfg.dead_code_every == 0:
            stats.restarts += q.restart_dead_codes(optimizer).sum()
        if model_ema is not None:
            model_ema.update(model)
        stats.add_step(step, x.shape[0], loss, recon_loss, loss_dict, grad_norm, info["code_counts"], rt,
                       {k: info[k] for k in q.train_metrics})
        guard.add(step, recon_loss)
        step += 1
        if (i + 1) % check_every == 0 or i + 1 == n_steps:
            stats.check(bar)                                              # one host sync
        if (i + 1) % cfg.progress_every == 0 or i + 1 == n_steps:
            bar.show(loss=loss, ppl=info["perplexity"])
        bar.update()
    bar.close()
    metrics = stats.metrics(n_steps)
    metrics.update(q.histogram_metrics(stats.counts, stats.acc.n))
    return {**metrics, "vq_loss_weight": w, "recon_jump_max": float(guard.ratio_max), **q.extra_metrics()}, step


class ModelEMA:
    """An exponential moving average of a model's trainable parameters (``--model_ema DECAY``), as the LitEma of IBQ's
    authors (TencentARC/SEED-Voken, src/IBQ/modules/ema.py, from CompVis latent-diffusion's), updated after every
    training step:

        s <- s - (1 - d) (s - p)      for each parameter p,

    d = decay (their IBQ: LitEma(self) with use_num_upates False, so 0.999 from the first update), or with ``warmup``
    (LitEma's use_num_upates, latent-diffusion's default) d = min(decay, (1 + n) / (10 + n)) at update n (2/11 at the
    first). The average starts at the parameters as they are when it is made. Buffers (EMA codebooks, BA-VQ's running
    marginal, ...) are not averaged: ``applied`` puts the averaged parameters into the model and leaves its buffers
    as trained, as their validation does (copy_to copies parameters only). ``state_dict`` holds the averages and n,
    so a checkpoint resumes it exactly."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _pairs(self, model: nn.Module) -> tuple[list, list]:
        live = dict(model.named_parameters())
        return list(self.shadow.values()), [live[n] for n in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        shadow, live = self._pairs(model)
        torch._foreach_sub_(shadow, torch._foreach_mul(torch._foreach_sub(shadow, [p.detach() for p in live]), 1.0 - d))

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The averaged parameters in ``model`` inside the block, its own after it."""
        shadow, live = self._pairs(model)
        kept = [p.detach().clone() for p in live]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in live], shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in live], kept)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


def _loss_weight(quantized_steps: int, warmup_steps: float) -> float:
    """Weight of the quantizer losses: 0 before the quantized phase, then a linear warm-up to 1."""
    if quantized_steps < 0:
        return 0.0
    return min(1.0, quantized_steps / warmup_steps) if warmup_steps > 0 else 1.0


def _backward_and_step(loss, model, optimizer, rt: Runtime, clip: float, after_backward=None) -> torch.Tensor:
    """Backward, ``after_backward(model)`` if given, gradient clipping (returns the norm before clipping)
    and the optimizer step; with fp16 the scaled backward, unscaling before clipping, and the scaler
    skipping inf steps."""
    optimizer.zero_grad(set_to_none=True)
    if rt.scaler is None:
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return grad_norm
    rt.scaler.scale(loss).backward()
    if after_backward is not None:
        after_backward(model)
    rt.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    rt.scaler.step(optimizer)                                             # skips steps with inf gradients
    rt.scaler.update()
    return grad_norm


class _Accumulator:
    """Sample-weighted sums of scalar tensors kept on the device; read once with ``means()``."""

    def __init__(self, state: dict | None = None, device=None):
        self.sums, self.n = {}, 0
        if state is not None:
            self.sums = {k: v.to(device) for k, v in state["sums"].items()}
            self.n = state["n"]

    def add(self, values: dict, n: int):
        for k, v in values.items():
            v = v.detach().float() * n
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += n

    def means(self) -> dict:
        if not self.sums:
            return {}
        keys = list(self.sums)
        vals = torch.stack([self.sums[k] for k in keys]).cpu().tolist()   # one host sync
        return {k: v / max(self.n, 1) for k, v in zip(keys, vals)}

    def state(self) -> dict:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "n": self.n}


class NonFiniteLoss(Exception):
    def __init__(self, step: int, terms: list):
        super().__init__(f"non-finite {terms} at step {step}")
        self.step, self.terms = step, terms


class LossExploded(Exception):
    """The loss of ``step`` was ``ratio`` x the minimum of the ``window`` steps before it (> ``factor``)."""

    def __init__(self, step: int, ratio: float, factor: float, window: int):
        super().__init__(f"loss exploded at step {step} ({ratio:.3g} x its recent minimum)")
        self.step, self.ratio, self.factor, self.window = step, ratio, factor, window


class StopRequested(Exception):
    """Raised inside train_epoch at a batch boundary when a stop was requested; ``partial_epoch``
    is what ``train_epoch(resume_from=...)`` needs to finish the epoch."""

    def __init__(self, partial_epoch: dict, step: int):
        super().__init__("stop requested")
        self.partial_epoch, self.step = partial_epoch, step


class LossGuard:
    """Detects a loss explosion that is not (yet) NaN: step t trips it when its reconstruction loss
    (the MSE on the [-1, 1] scale that PSNR measures, the same quantity for every quantizer) exceeds
    ``factor`` times its minimum over the previous ``window`` steps of the same phase,

        L_t > factor * min(L_{t-window}, ..., L_{t-1}),   L = recon_loss,

    i.e. with the default factor 100, the reconstruction got 20 dB worse than the best of the window.
    The quantizer's own terms are not watched: BA-VQ's range over four orders of magnitude in a normal
    reduced-protocol run as beta anneals (docs/running.md, "Divergence"), while an explosion of any of
    them reaches the decoder's output. ``reset()`` empties the window where the reconstruction changes
    meaning (the first quantized step after ``pretrain_epochs``). Everything stays on the device: the
    window is a ring buffer, the first tripping step and the largest ratio L_t / min(window) are 0-dim
    tensors that ``_EpochStats.check`` reads with the non-finite check, every ``min(progress_every,
    window)`` steps. It lives as long as the run (the window spans epochs) and goes into checkpoints
    (``state()``), so a resumed run watches as one that never stopped."""

    def __init__(self, factor: float, window: int, device, state: dict | None = None):
        self.factor, self.window = factor, window
        self.buf = torch.full((window,), math.inf, device=device)          # the last `window` L, inf = empty
        self.pos = 0                                                        # steps recorded since reset
        self.tripped = torch.full((), -1, dtype=torch.long, device=device)  # first step over the factor, -1 = none
        self.tripped_ratio = torch.zeros((), device=device)
        self.ratio_max = torch.zeros((), device=device)                     # largest L_t / min(window) seen
        if state is not None and state["window"] == window:
            self.buf = state["buf"].to(device)
            self.pos, self.ratio_max = state["pos"], state["ratio_max"].to(device)

    @property
    def on(self) -> bool:
        return self.factor > 0

    def reset(self) -> None:
        self.buf.fill_(math.inf)
        self.pos = 0

    def add(self, step: int, recon_loss: torch.Tensor) -> None:
        if not self.on:
            return
        L = recon_loss.detach().float()
        ratio = L / self.buf.min()                                          # 0 while the window is empty
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))  # NaN/Inf: the non-finite check's
        newly = (ratio > self.factor) & (self.tripped < 0)
        self.tripped = torch.where(newly, torch.full_like(self.tripped, step), self.tripped)
        self.tripped_ratio = torch.where(newly, ratio, self.tripped_ratio)
        self.ratio_max = torch.maximum(self.ratio_max, ratio)
        self.buf[self.pos % self.window] = L
        self.pos += 1

    def state(self) -> dict:
        return {"window": self.window, "buf": self.buf.cpu(), "pos": self.pos, "ratio_max": self.ratio_max.cpu()}


class _EpochStats:
    """What a training epoch accumulates on the device, read once at the end: sample-weighted loss
    sums, the code histogram, gradient norms, dead-code restarts and the first non-finite step.
    ``state(batch)`` / ``resume_from`` carry an interrupted epoch over to its continuation."""

    def __init__(self, K: int, device, generator: torch.Generator, resume_from: dict | None,
                 guard: "LossGuard | None" = None):
        zero = lambda dtype=torch.float32: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        if resume_from is None:
            self.gen_state = generator.get_state()                 # the epoch's permutation is drawn from here
            self.start, self.acc = 0, _Accumulator()
            self.counts = torch.zeros(K, dtype=torch.long, device=device)
            self.extra = {"grad_norm_max": zero(), "grad_norm_sum": zero(), "grad_norm_n": zero(torch.long),
                          "restarts": zero(torch.long)}
        else:
            self.gen_state = resume_from["gen_state"]
            generator.set_state(self.gen_state)
            self.start = resume_from["batch"]
            self.acc = _Accumulator(resume_from["acc"], device)
            self.counts = resume_from["counts"].to(device)
            self.extra = {k: v.to(device) for k, v in resume_from["extra"].items()}
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)   # first non-finite step, -1 = none
        self.bad_terms, self.names = None, None
        self.guard = guard                                                  # train_epoch's explosion watch

    @property
    def restarts(self) -> torch.Tensor:
        return self.extra["restarts"]

    @restarts.setter
    def restarts(self, value: torch.Tensor) -> None:
        self.extra["restarts"] = value

    def add_step(self, step, n, loss, recon_loss, loss_dict, grad_norm, code_counts, rt: Runtime,
                 diagnostics: dict | None = None) -> None:
        # non-finite terms: remember the first bad step and which terms (with fp16 the scaler handles
        # inf gradients itself, so only the loss terms are checked)
        check_grad = rt.scaler is None
        terms = torch.stack([recon_loss.detach().float(), *[v.detach().float() for v in loss_dict.values()],
                             *([grad_norm.detach().float()] if check_grad else [])])
        if self.names is None:
            self.names = ["recon_loss", *loss_dict.keys(), *(["gradient norm"] if check_grad else [])]
            self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=terms.device)
        bad = ~torch.isfinite(terms)
        newly = bad.any() & (self.bad_step < 0)
        self.bad_step = torch.where(newly, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_terms = torch.where(newly, bad, self.bad_terms)
        self.acc.add({"loss": loss, "recon_loss": recon_loss, **loss_dict, **(diagnostics or {})}, n)
        gn = grad_norm.detach().float()
        gn_ok = torch.where(torch.isfinite(gn), gn, torch.zeros_like(gn))   # fp16: the scaler skipped this step
        self.extra["grad_norm_sum"] += gn_ok
        self.extra["grad_norm_n"] += torch.isfinite(gn).long()
        self.extra["grad_norm_max"] = torch.maximum(self.extra["grad_norm_max"], gn_ok)
        self.counts += code_counts

    def check(self, bar=None) -> None:
        """Raise NonFiniteLoss naming the first non-finite step and its terms, or LossExploded naming the
        first step the loss guard tripped on, whichever came first (one host sync)."""
        g = self.guard
        bad, tripped = (torch.stack([self.bad_step, g.tripped]).tolist() if g is not None and g.on
                        else (int(self.bad_step), -1))
        if bad < 0 and tripped < 0:
            return
        if bar is not None:
            bar.close()
        if bad >= 0 and (tripped < 0 or bad <= tripped):
            raise NonFiniteLoss(bad, [n for n, b in zip(self.names, self.bad_terms.tolist()) if b])
        raise LossExploded(tripped, float(g.tripped_ratio), g.factor, g.window)

    def state(self, batch: int) -> dict:
        return {"gen_state": self.gen_state, "batch": batch, "acc": self.acc.state(), "counts": self.counts.cpu(),
                "extra": {k: v.cpu() for k, v in self.extra.items()}}

    def metrics(self, n_steps: int) -> dict:
        """Sample-weighted mean loss terms; gradient norm mean (over finite steps) and max, before
        clipping; fp16 steps the scaler skipped; restarts; perplexity, usage and dead codes of every
        code index of the epoch, and the histogram ``code_counts`` (K,) (a CPU tensor)."""
        self.check()
        m = self.acc.means()
        n_finite = int(self.extra["grad_norm_n"])
        m["grad_norm"] = float(self.extra["grad_norm_sum"]) / max(n_finite, 1)
        m["grad_norm_max"] = float(self.extra["grad_norm_max"])
        m["skipped_steps"] = n_steps - n_finite
        m["dead_code_restarts"] = int(self.extra["restarts"])
        return {**m, **_histogram_metrics(self.counts, self.acc.n)}


def _histogram_metrics(counts: torch.Tensor, n_images: int) -> dict:
    """perplexity, usage_rate, dead_codes (never used), the rate (entropy of the histogram in bits per
    code and per image) and the histogram itself (CPU) of a pass over ``n_images`` images."""
    h = float(entropy_bits(counts))
    codes_per_image = float(counts.sum()) / max(n_images, 1)
    return {"perplexity": float(perplexity_from_counts(counts)), "usage_rate": float(usage_from_counts(counts)),
            "dead_codes": int((counts == 0).sum()), "code_entropy_bits": h, "bits_per_image": h * codes_per_image,
            "code_counts": counts.cpu()}


class _ProgressBar:
    """A tqdm bar when ``enabled`` and stderr is a terminal; every method is a no-op otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled and sys.stderr.isatty():              # no carriage-return floods in log files
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def show(self, **values) -> None:
        """Shows 0-dim tensors as numbers (a host read: call it only every ``progress_every`` steps)."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v.item():.4g}" for k, v in values.items()})

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@torch.no_grad()
def validate(model: VQVAE, images: torch.Tensor, batch_size: int, progress: bool = False,
             rt: Runtime | None = None, observe=None) -> dict:
    """Whole-set validation in eval mode (hard codes for every quantizer); restores the mode.

    Returns sample-weighted mean losses, ``psnr`` (mean per-image PSNR, dB, [0, 1] scale),
    ``mse`` (same as recon_loss), perplexity, usage and dead codes over *all* code indices of the
    set, ``code_counts`` (K,) (a CPU tensor), ``psnr_<name>`` for each of the quantizer's ``other_decoder_inputs``
    (BA-VQ: ``psnr_soft``, the reconstruction from P.E), the quantizer's ``eval_metrics`` and ``extra_metrics``.
    ``observe``: called with (x, x_recon, info) of every batch, so that other metrics need no second pass
    (e.g. ``vqvae_analysis.PaperMetrics.add``).
    """
    rt = rt or Runtime(images.device)
    acc = _Accumulator()
    q = model.quantizer
    counts = torch.zeros(q.num_embeddings, dtype=torch.long, device=images.device)
    all_indices = []
    bar = _ProgressBar(math.ceil(images.shape[0] / batch_size), "val", progress)
    with evaluating(model):
        for _, x in eval_batches(model, images, batch_size, rt):
            with rt.autocast():
                x_recon, recon_loss, loss_dict, info = model(x)
            values = {"loss": q.reconstruction_objective(recon_loss) + sum(loss_dict.values()),
                      "recon_loss": recon_loss, **loss_dict}
            # psnr: the batch mean of per-image PSNR, weighted by batch size = mean over all images
            values["psnr"] = psnr_per_image(x, x_recon).mean()
            values["ssim"] = ssim_per_image(x, x_recon).mean()
            for name, z_other in info.get("other_decoder_inputs", {}).items():   # e.g. BA-VQ's P.E ("soft")
                with rt.autocast():
                    x_other = model.decoder(z_other)
                values[f"psnr_{name}"] = psnr_per_image(x, x_other).mean()
            values.update({k: info[k] for k in model.quantizer.eval_metrics})
            if observe is not None:
                observe(x, x_recon, info)
            acc.add(values, x.shape[0])
            counts += info["code_counts"]
            all_indices.append(info["code_indices"])
            bar.update()
        bar.close()
        metrics = acc.means()
        metrics["mse"] = metrics["recon_loss"]
        metrics.update(_histogram_metrics(counts, images.shape[0]), **q.histogram_metrics(counts, images.shape[0]))
        metrics.update(q.code_set_metrics(torch.cat(all_indices)), **q.extra_metrics())
    return metrics


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """'auto' picks MPS, then CUDA, then CPU; 'cpu' | 'cuda' | 'cuda:N' | 'mps' force one."""
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        if mps_ok:
            return torch.device("mps")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        if torch.version.cuda is None:                     # a CPU-only build of PyTorch
            raise BavqError(f"--device {name} was asked for, but this PyTorch ({torch.__version__}) is a CPU-only "
                            "build. Install a CUDA build of PyTorch (pip install -r requirements-cuda.txt on a machine "
                            "with an NVIDIA GPU), or use --device auto or --device cpu.")
        raise BavqError(f"--device {name} was asked for, but PyTorch (torch {torch.__version__}, a CUDA {torch.version.cuda} "
                        "build) finds no usable GPU on this machine: no NVIDIA driver, no GPU visible to this process "
                        "(check nvidia-smi and CUDA_VISIBLE_DEVICES), or a driver older than that CUDA version. Fix "
                        "that, or use --device auto or --device cpu.")
    if name == "mps" and not mps_ok:
        raise BavqError("--device mps was asked for, but the Apple MPS backend is not available here. "
                        "Use --device auto or --device cpu.")
    return torch.device(name)


# =============================================================================
# data
# =============================================================================

DATASETS = declared_choices("dataset")
IMAGE_SIZE = 32                     # the architecture is drawn for 32x32 inputs
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (torch's default float dtype); same as ToTensor() + Normalize(0.5, 0.5)."""
    return images_u8.to(torch.get_default_dtype()).div_(127.5).sub_(1.0)      # float32 unless a test sets float64


def evenly_spaced(n_total: int, n: int) -> torch.Tensor:
    """Indices of ``n`` items spread evenly over ``n_total`` (covers every class of a sorted folder)."""
    if n <= 0 or n >= n_total:
        return torch.arange(n_total)
    return torch.linspace(0, n_total - 1, n, dtype=torch.float64).round().long()


def _fake_images(n: int, seed: int) -> torch.Tensor:
    """Deterministic smooth colour images (N, 3, 32, 32) uint8: low-frequency noise upsampled,
    so a small autoencoder can learn them and PSNR rises with training."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    img = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def load_dataset(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 tensors of shape (N, 3, 32, 32) on the CPU."""
    if cfg.dataset == "fake":
        return _fake_images(cfg.train_subset or 2048, seed=0), _fake_images(cfg.val_subset or 512, seed=1)
    root = Path(cfg.data_dir).expanduser()
    if cfg.dataset == "cifar10":
        train_u8, val_u8 = _load_cifar10(root)
        train_u8 = train_u8[evenly_spaced(len(train_u8), cfg.train_subset)]
        val_u8 = val_u8[evenly_spaced(len(val_u8), cfg.val_subset)]
        return train_u8, val_u8
    if cfg.dataset == "folder":
        if not root.is_dir():
            raise BavqError(f"Data directory '{root}' does not exist. --dataset folder needs --data_dir DIR with "
                            "DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (val/ is accepted for test/), "
                            "e.g. 'tar -xzf cifar10-jpg.tar.gz -C DIR'.")
        val_split = "test" if (root / "test").is_dir() else "val"
        if not (root / "train").is_dir() or not (root / val_split).is_dir():
            raise BavqError(f"Data directory '{root}' must contain 'train/' and 'test/' (or 'val/') folders of "
                            f"class subfolders with images; it contains: "
                            f"{', '.join(sorted(p.name for p in root.iterdir())[:10]) or 'nothing'}. "
                            "Point --data_dir at the folder that holds train/ and test/.")
        return (_load_folder_split(root, "train", cfg.train_subset, cfg.num_workers, cfg.skip_bad_images),
                _load_folder_split(root, val_split, cfg.val_subset, cfg.num_workers, cfg.skip_bad_images))
    raise BavqError(f"dataset '{cfg.dataset}' is unknown (choose from {', '.join(DATASETS)}).")


def _load_cifar10(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import shutil
    import torchvision
    created = not data_dir.exists()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a firewalled network fails instead of hanging forever
    try:
        tr = torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
        te = torchvision.datasets.CIFAR10(str(data_dir), train=False, download=True)
    except Exception as e:  # URLError, socket timeout, corrupt archive, ...
        if created:                                   # leave nothing behind when nothing could be downloaded
            shutil.rmtree(data_dir, ignore_errors=True)
        raise BavqError(
            f"Could not download CIFAR-10 into '{data_dir}' ({type(e).__name__}: {e}). This machine seems to have no "
            "network access to the CIFAR-10 server. Either run where there is network, or copy the CIFAR-10 python "
            "archive (cifar-10-python.tar.gz, from https://www.cs.toronto.edu/~kriz/cifar.html) into that folder, or "
            "use images already on disk with '--dataset folder --data_dir DIR', where DIR holds "
            "train/<class>/<images> and test/<class>/<images> (any format PIL reads).") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    # torchvision keeps CIFAR-10 as a (N, 32, 32, 3) uint8 numpy array
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return to_t(tr.data), to_t(te.data)


def _list_images(split_dir: Path) -> list[Path]:
    files = [p for p in sorted(split_dir.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return files


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes image files to uint8 (3, 32, 32), resizing when they are not 32x32."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """(image (3, 32, 32) uint8, whether it could be read); an unreadable file gives zeros, False."""
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                im = _to_rgb8(im)
                if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8).copy()
        except Exception:                                  # truncated, corrupt, not an image
            return torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), False
        return torch.from_numpy(arr).permute(2, 0, 1), True   # (3, 32, 32)


DECODE_VERSION = "rgb8-v2"       # changes whenever _to_rgb8 or the resizing changes (part of the cache key)


def _to_rgb8(im):
    """Any mode PIL opens -> 8-bit RGB. 16-bit and 32-bit integer grayscale (I;16*, I) are scaled from
    0..65535 to 0..255 (PIL's own convert clips them to 255, i.e. nearly white); float grayscale (F)
    is taken as 0..1 if its maximum is <= 1, else as 0..255; palette, CMYK, RGBA, LA, L and 1 use PIL's
    conversion (alpha is dropped, as torchvision's ImageFolder does)."""
    from PIL import Image
    if im.mode.startswith("I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a) <= 1.0 else a
        im = Image.fromarray(np.clip(np.round(np.nan_to_num(a)), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def _decode_files(paths: list[Path], num_workers: int, skip_bad: bool = False) -> torch.Tensor:
    """Decode ``paths`` to (N, 3, 32, 32) uint8 in ``num_workers`` processes (capped at the CPU count).
    A file PIL cannot read is an error naming it, or, with ``skip_bad``, left out with a count."""
    if not paths:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(_ImageFiles(paths), batch_size=512, shuffle=False,
                                         num_workers=min(num_workers, os.cpu_count() or 1))
    images, ok = map(torch.cat, zip(*loader))
    bad = [paths[i] for i in (~ok).nonzero().flatten().tolist()]
    if bad and not skip_bad:
        raise BavqError(f"{len(bad)} image file(s) cannot be read, e.g. '{bad[0]}'"
                        f"{' and ' + repr(str(bad[1])) if len(bad) > 1 else ''}. Replace or delete them, or pass "
                        "--skip_bad_images to train without them (the count is printed).")
    if bad:
        print(f"[bavq] skipped {len(bad)} unreadable image file(s) (e.g. '{bad[0]}').", file=sys.stderr)
    return images[ok]


def _load_folder_split(root: Path, split: str, subset: int, num_workers: int, skip_bad: bool = False) -> torch.Tensor:
    """All (or ``subset`` evenly spaced) images under ``root/split`` as (N, 3, 32, 32) uint8.
    A full split is decoded once and cached next to the data as a .pt file keyed by the decode settings
    and every file's path, size and modification time (ns)."""
    split_dir = root / split
    paths = _list_images(split_dir)
    if not paths:
        raise BavqError(f"No images found under '{split_dir}'. --dataset folder expects the ImageFolder layout "
                        f"DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg (val/ is accepted for test/); "
                        f"check --data_dir (now '{root}').")
    if subset and subset < len(paths):
        chosen = [paths[i] for i in evenly_spaced(len(paths), subset).tolist()]
        return _decode_files(chosen, num_workers, skip_bad)
    key = hashlib.sha1(f"{DECODE_VERSION} {IMAGE_SIZE} bicubic".encode())    # the decode settings
    for p in paths:                                 # and what changes when a file's content changes
        st = p.stat()
        key.update(f"{p.relative_to(root)} {st.st_size} {st.st_mtime_ns}".encode())
    cache = root / f".bavq_{split}_{len(paths)}_{key.hexdigest()[:12]}.pt"
    if cache.is_file():
        try:
            images = torch.load(cache, map_location="cpu", weights_only=True)
            if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape[0] == len(paths):
                return images
        except Exception:
            pass  # a corrupt cache is rebuilt below
    images = _decode_files(paths, num_workers, skip_bad)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")     # write, then rename: never a truncated cache
    try:
        torch.save(images, tmp)
        os.replace(tmp, cache)
    except OSError as e:                                          # read-only data folder, disk full, ...
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        print(f"[bavq] note: could not cache decoded images at '{cache}' ({e.strerror or type(e).__name__}); they "
              "will be decoded again next run.", file=sys.stderr)
    return images


# =============================================================================
# config checking and YAML
# =============================================================================
# One place for each rule: a field's own rules (choices, bounds, its ``rule``) are declared with the field
# (``setting``) and checked by ``field_problems``; rules across fields are ``config_problems``' own; a
# quantizer's rules are its ``config_problems``. ``Config.validate`` (every run) and ``VQVAE(...)`` (a model
# built in a notebook) both raise them; no constructor checks a setting again.

DEVICES = ("auto", "cpu", "cuda", "mps")            # and cuda:N


def known_device(name: str) -> bool:
    """One of DEVICES, or cuda:N (config checking and evaluate.py's --device)."""
    return name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())


def _device_problem(v: str) -> str | None:
    return None if known_device(v) else f"device '{v}' is unknown (choose from {', '.join(DEVICES)}, or cuda:N)"


def _name_problem(v: str) -> str | None:
    if "/" in v or v in (".", ".."):
        return f"name '{v}' must be a plain directory name (no '/')"
    if v != v.strip() or (v != "" and v.strip() == ""):
        return f"name {v!r} must not be blank or start or end with spaces"
    return None


def _levels_problem(v: list) -> str | None:
    return None if len(v) >= 1 and all(l >= 2 for l in v) else f"fsq_levels must be one or more integers >= 2 (got {v})"


def _explode_problem(v: float) -> str | None:
    return None if v == 0 or v > 1 else (f"explode_factor must be 0 (off) or above 1 (got {v}: at or below 1 an "
                                         "ordinary step would count as an explosion)")


def _metrics_problem(v: list) -> str | None:
    return None if all(m in EVAL_METRICS for m in v) else (f"eval_metrics {v} has unknown names (choose from "
                                                           f"{', '.join(EVAL_METRICS)})")


def _allowed(options) -> tuple:
    """A field's declared ``choices`` as a tuple (a registry's are a function, called now)."""
    return tuple(options() if callable(options) else options)


def field_choices() -> dict:
    """{Config field: its allowed values} for every field declared with ``choices``; the CLI (train.py)
    reads this, ``field_problems`` checks them."""
    return {f.name: _allowed(f.metadata["choices"]) for f in fields(Config) if "choices" in f.metadata}


BOUNDS = ("at_least", "above", "below", "at_most")      # the numeric bounds ``setting`` declares


def _bound_problem(key: str, value, b: dict) -> str | None:
    """The sentence for a value outside its declared bounds, or None."""
    low = ("at_least", b["at_least"]) if "at_least" in b else ("above", b["above"]) if "above" in b else None
    high = ("below", b["below"]) if "below" in b else ("at_most", b["at_most"]) if "at_most" in b else None
    ok = ((low is None or (value >= low[1] if low[0] == "at_least" else value > low[1]))
          and (high is None or (value < high[1] if high[0] == "below" else value <= high[1])))
    if ok:
        return None
    if high is None:
        return f"{key} must be {'>=' if low[0] == 'at_least' else '>'} {low[1]} (got {value})"
    lo = "[" if low and low[0] == "at_least" else "("
    hi = ")" if high[0] == "below" else "]"
    return f"{key} must be in {lo}{low[1] if low else '-inf'}, {high[1] if high[1] != 2**63 else '2**63'}{hi} (got {value})"


def field_problems(key: str, value) -> list:
    """The problems of one field's value by the rules declared with it (``setting``): its choices, its bounds,
    its own ``rule``, and for a float, that it is finite."""
    f = Config.__dataclass_fields__[key]
    rules, out = f.metadata, []
    if "choices" in rules:
        options = _allowed(rules["choices"])
        if value not in options:
            out.append(f"{key} '{value}' is unknown (choose from {', '.join(options)})")
    if isinstance(value, float) and not math.isfinite(value):
        return out + [f"{key} must be a finite number (got {value})"]
    bounds = {k: v for k, v in rules.items() if k in BOUNDS}
    if bounds:
        out += [p for p in [_bound_problem(key, value, bounds)] if p]
    if "rule" in rules:
        out += [p for p in [rules["rule"](value)] if p]
    return out


def config_problems(cfg: Config) -> list:
    """Every problem of ``cfg``'s values, one sentence each (``Config.validate`` raises them): each field's own
    rules (``field_problems``), then the rules across fields, then the chosen quantizer's."""
    problems = [p for f in fields(Config) for p in field_problems(f.name, getattr(cfg, f.name))]

    def need(ok, msg):
        if not ok:
            problems.append(msg)

    need(not (cfg.cosine and cfg.affine_reparam != "off"), "affine_reparam and cosine do not combine (the affine "
         "map acts on Euclidean codes and would be undone by the normalisation); choose one")
    need(cfg.beta_end >= cfg.beta_start,
         f"beta_end must be >= beta_start (got beta_start={cfg.beta_start}, beta_end={cfg.beta_end})")
    need(not cfg.pretrain_epochs or cfg.init in DATA_INITS,
         f"pretrain_epochs {cfg.pretrain_epochs} needs --init kmeans or --init data (after the pretraining the "
         f"codebook is initialised from the trained encoder's outputs; got --init {cfg.init})")
    need(cfg.pretrain_epochs < cfg.epochs, f"pretrain_epochs ({cfg.pretrain_epochs}) must be fewer than epochs "
         f"({cfg.epochs}), or no epoch trains the quantizer")
    need(len(cfg.resolved_name().encode()) <= 200, f"name is {len(cfg.resolved_name().encode())} bytes long; "
         "use at most 200 (file systems allow 255 per folder name)")
    if cfg.quantizer in QUANTIZERS:
        problems += _quantizer_problems(cfg, QUANTIZERS[cfg.quantizer])
    return problems


def _they(names: list, one: str, many: str) -> str:
    """'init applies' / 'init, cosine apply': the names and the verb that agrees with them."""
    return f"{', '.join(names)} {one if len(names) == 1 else many}"


def _a(word: str) -> str:
    """'an int', 'a float'."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _quantizer_problems(cfg: Config, qcls: type) -> list:
    """Settings that the chosen quantizer cannot honour (asked of its class), and its own checks."""
    problems = []
    if not qcls.has_codebook:
        used = remedies_in_use(cfg)
        if used:
            with_codebook = ", ".join(n for n, c in QUANTIZERS.items() if c.has_codebook)
            problems.append(f"{_they(used, 'applies', 'apply')} to codebook quantizers ({with_codebook}; the docs' "
                            f"remedy table says which takes which), not to {cfg.quantizer}, {qcls.remedies_note}; "
                            "leave them at their defaults")
    if not qcls.loss_names and cfg.vq_loss_warmup_epochs != 0:
        problems.append(f"vq_loss_warmup_epochs has no effect with {cfg.quantizer}, which has no quantizer loss")
    return problems + qcls.config_problems(cfg)


def config_comments() -> dict:
    """{field name: its comment in the Config dataclass} (the CLI's --help text)."""
    import re
    out = {}
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
        if m and m.group(1) in {f.name for f in fields(Config)}:
            out[m.group(1)] = m.group(2).strip()
    return out


def config_fields() -> dict:
    """{field name: python type} for every Config field."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _coerce(key: str, value, typ, source: str):
    """Check one config value against its declared type. Raises BavqError."""
    def bad():
        return BavqError(f"Config key '{key}' from {source} must be of type {typ.__name__}, but got "
                         f"{value!r} ({type(value).__name__}). Change it to {_a(typ.__name__)} value, e.g. "
                         f"{key}: {getattr(Config(), key)!r}.")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad()
    if typing.get_origin(typ) is list:   # list[int] (fsq_levels), list[str] (eval_metrics)
        elem = typing.get_args(typ)[0]
        if isinstance(value, (list, tuple)) and all(isinstance(v, elem) and not isinstance(v, bool) for v in value):
            return list(value)
        raise bad()
    raise TypeError(f"unsupported config type {typ}")  # pragma: no cover - a bug in Config


def make_config(overrides: dict | None = None, source: str = "arguments") -> Config:
    """Defaults < ``overrides``. Unknown keys and wrong types are BavqErrors that list the valid keys."""
    overrides = dict(overrides or {})
    known = config_fields()
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise BavqError(f"Unknown config key(s) {', '.join(repr(k) for k in unknown)} in {source}. "
                        f"Valid keys are: {', '.join(known)}. Check the spelling (keys use underscores, "
                        "as the command-line flags do).")
    values = {k: _coerce(k, v, known[k], source) for k, v in overrides.items()}
    qcls = QUANTIZERS.get(values.get("quantizer", Config.quantizer))
    if qcls is not None:                              # settings a quantizer derives from the others given
        values = qcls.complete_config(values)
    return Config(**values)


def load_yaml_config(path: str | os.PathLike) -> dict:
    """Read a YAML config file into a dict of overrides (validated by make_config)."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise BavqError(f"Config file '{path}' does not exist. Pass the path of a YAML file such as "
                        "config.yaml or config_mac.yaml with --config.")
    class UniqueKeys(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if dup:
            raise BavqError(f"Config file '{path}' gives {', '.join(map(repr, dup))} more than once (line "
                            f"{node.start_mark.line + 1} on). Keep one line per key; nothing was run.")
        return loader.construct_mapping(node, deep=deep)
    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeys)
    except yaml.YAMLError as e:
        raise BavqError(f"Config file '{path}' is not valid YAML ({str(e).splitlines()[0]}). "
                        "Fix the syntax: one 'key: value' per line.") from None
    if data is None:
        raise BavqError(f"Config file '{path}' is empty (or only comments), so it sets nothing. Put 'key: value' "
                        "lines in it (e.g. quantizer: ba_vq), or drop --config to use the defaults.")
    if not isinstance(data, dict):
        raise BavqError(f"Config file '{path}' must hold a mapping of 'key: value' lines, not a "
                        f"{type(data).__name__}.")
    return data


def config_to_yaml(cfg: Config) -> str:
    import yaml
    return yaml.safe_dump(asdict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- beside the method
# Running experiments lives in vqvae_experiment.py (run directories, checkpoints, resume, the run lock, stop
# signals, torchrun, W&B, pictures, ``train(cfg)``, ``load_run``, ``evaluate_run``), grids of runs in
# vqvae_grid.py, the analysis that only evaluation uses in vqvae_analysis.py (R(D), the papers' metric
# conventions, the frontier), BA-VQ's fused fast path in vqvae_fused.py. For notebooks, the public names of
# the first three (each module's ``__all__``) are reachable from here too (``vqvae.train``, ``vqvae.load_run``,
# ``vqvae.evaluate_run``, ``vqvae.run_sweep``, ``vqvae.latent_rate_distortion``); the library's own scripts
# and modules import them from where they are defined.

_BESIDE = ("vqvae_experiment", "vqvae_grid", "vqvae_analysis")


def __getattr__(name: str):
    """``vqvae.NAME`` for the public names (``__all__``) of the modules beside the method, imported on first use."""
    if not name.startswith("_"):                   # never for dunders (the import system asks for __path__)
        import importlib
        for module in _BESIDE:
            m = importlib.import_module(module)
            if name in m.__all__:
                return getattr(m, name)
    raise AttributeError(f"module 'vqvae' has no attribute '{name}'")


def __dir__():
    import importlib
    return sorted(set(globals()) | {n for module in _BESIDE for n in importlib.import_module(module).__all__})
