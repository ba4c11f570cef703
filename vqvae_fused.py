"""BA-VQ's fused fast path (``--ba_impl fused``, the default): the Blahut-Arimoto soft assignment of
``vqvae.blahut_arimoto`` and its gradient, in one pass over row chunks of the (N, K) matrices with a
hand-written exact backward, instead of autograd through the iterations.

The reference is ``vqvae.blahut_arimoto`` (with ``BAQuantizer``'s autograd branch, ``--ba_impl autograd``),
and it is what to edit: change it, check training with --ba_impl autograd, port the change here (both
forward chunks, the backward chunk, and the maths in ``_FusedBA``'s docstring), then run
``pytest tests/test_ba_fused.py``: fused == autograd in float64, gradients included, at every chunking;
the float32 gradient as accurate as autograd's at any beta.

Holds: the chunk kernels (``_ba_forward_chunk``, ``_ba_forward_chunk_sums``, ``_ba_backward_chunk``),
``_FusedBA`` (the autograd.Function with its contract), ``ba_soft_quantize`` (its entry point),
``compiled_ba_kernels`` (``--compile``), ``BAWorkspace`` (the CPU backward's reused accumulators),
the exp/logsumexp helpers that flush subnormals, and ``distance_sums`` (BA-VQ's diagnostics, shared with
the reference path). It needs only torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def distance_sums(d: torch.Tensor, two: torch.Tensor | None = None) -> torch.Tensor:
    """(3,): over the rows of d (c, K), the sums of sum_k d, min_k d and the gap d_(2) - d_(1) between
    the nearest and second-nearest code (BA-VQ's diagnostics); ``two``: those two distances per row
    (c, 2) when the caller has them."""
    two = d.topk(2, dim=1, largest=False).values if two is None else two            # (c, 2)
    return torch.stack([d.sum(), two[:, 0].sum(), (two[:, 1] - two[:, 0]).sum()])


def ba_chunk_rows(N: int, K: int, chunk_rows: int, device: torch.device | None = None) -> int:
    """Rows per chunk: ``chunk_rows`` if > 0, else about 2**24 matrix elements (64 MB in float32) on a
    GPU (fewer, larger kernels) and 2**22 (16 MB) elsewhere (chunks that stay in the CPU's caches: the
    fused pass, forward and backward at N = 16384, K = 8192, D = 256, 5 iterations, took 7.85 s in
    2048-row chunks and 5.51 s in 512-row chunks on the 2-core CPU; 5.5-5.7 s with 64-256 rows)."""
    if chunk_rows > 0:
        return chunk_rows
    return max(1, (1 << (24 if device is not None and device.type == "cuda" else 22)) // max(K, 1))


def exp_normal(L: torch.Tensor) -> torch.Tensor:
    """exp(L), with 0 for every argument at or below log(e x smallest normal float): the same as exp up to
    3.2e-38 per entry in float32 (6e-308 in float64), but on the CPU exp is 10-30x slower for
    arguments near or below log(smallest normal) (measured: 220 ms vs 8 ms for 4M float32 values in
    [-100, -88]), and any product with a value near the smallest normal float is subnormal, which makes
    a matmul about 90x slower (measured on the 2-core CPU: (8192, 1024) x (1024, 64) took 375 ms with a
    sharp P whose small entries were 3.2e-38 and 4.2 ms with them at 0). A sharp P (beta d spread over more
    than 87 nats) has such entries in most places. A NaN stays NaN."""
    floor = _exp_floor(L.dtype)
    return L.clamp_min(floor).exp().masked_fill_(L < floor, 0.0)


def _exp_floor(dtype: torch.dtype) -> float:
    """log(e x smallest normal float): below it exp gives subnormal values (slow on the CPU)."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def exp_normal_(L: torch.Tensor) -> torch.Tensor:
    """``exp_normal`` in place (L is overwritten), in two passes over memory instead of four: arguments at or
    below the floor become -inf (exp(-inf) = 0 is fast), then exp. Unlike ``exp_normal`` a NaN becomes 0: in
    the fused BA pass a NaN latent still shows, through its row's maximum, in lse and log Q."""
    return F.threshold_(L, _exp_floor(L.dtype), -math.inf).exp_()


def exp_normal_to(L: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``exp_normal`` of L written into ``out`` (L unchanged)."""
    return exp_normal_(out.copy_(L))


def logsumexp_rows(L: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """logsumexp over dim 0 of L (c, K) (K,), through ``exp_normal_`` of L minus its column maxima in
    ``out`` (c, K) (a new tensor when None; torch.logsumexp takes the slow exp path). A column of -inf
    gives -inf."""
    m = L.amax(dim=0)                                                                # (K,) column max
    finite = torch.isfinite(m)
    X = exp_normal_(torch.sub(L, torch.where(finite, m, torch.zeros_like(m)), out=out))
    return torch.where(finite, X.sum(0).log() + m, m)


class BAWorkspace:
    """Tensors that the fused BA backward keeps from one training step to the next (its two (N, K)
    accumulators; they hold nothing between steps: every backward writes them before reading). On the CPU
    a new 512 MB tensor costs its page faults every step (0.2 s of a 2.8 s backward at N = 16384, K = 8192
    on the 2-core CPU); on a GPU the caching allocator already reuses memory, so the backward keeps
    nothing there (kept tensors would only stop the forward from reusing it). A copy or a pickle of the
    model starts empty."""

    def __init__(self):
        self._kept = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``like``'s shape, dtype and device, the same one as last time if
        those match."""
        t = self._kept.get(name)
        if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            self._kept[name] = t = torch.empty_like(like)
        return t

    def clear(self) -> None:
        self._kept.clear()

    def __deepcopy__(self, memo):
        return BAWorkspace()

    def __getstate__(self):
        return {"_kept": {}}


def _work(ws, i: int, like: torch.Tensor, c: int, K: int) -> torch.Tensor:
    """Rows [:c] of work buffer ``i`` (C, K) of the fused BA pass, or a new (c, K) tensor without buffers
    (the compiled kernels). On the CPU a new 64 MB tensor per operation costs as much as the operation
    (page faults: measured 33 ms vs 14 ms for one exp over 2048 x 8192 floats), so each pass allocates its
    buffers once and every (c, K) operation writes into them."""
    return ws[i][:c] if ws is not None else torch.empty(c, K, dtype=like.dtype, device=like.device)


def _ba_forward_chunk(A_c: torch.Tensor, log_q: torch.Tensor, E: torch.Tensor, last: bool,
                      z_c: torch.Tensor | None = None, ws=None):
    """One BA iteration on a row chunk: L = log P_t = log_softmax(S), S = A + log Q_{t-1} (c, K); returns
    its column logsumexp (K,) and the row logsumexp of S (c,) (what the backward needs to rebuild P_t
    without a log_softmax); at the last iteration also z_q = P_T E (c, D), argmax_k P_T (c,), the chunk's
    ``assignment_sums`` (2,) and, when ``z_c`` is given, P_T^T z_c (K, D). ``ws``: two (C, K) work
    buffers (``_work``)."""
    c, K = A_c.shape
    S = torch.add(A_c, log_q, out=_work(ws, 0, A_c, c, K))                          # (c, K)
    L = torch.log_softmax(S, dim=1, out=_work(ws, 1, A_c, c, K))                    # (c, K)
    if last:
        top, idx = L.max(dim=1)                                                      # one pass: argmax and max
    else:
        top = L.amax(dim=1)                                                          # (amax: a third of max's time)
    lse = S.amax(dim=1) - top                        # logsumexp_k S: S - L at their common argmax, (c,)
    col = logsumexp_rows(L, out=_work(ws, 0, A_c, c, K))                            # logsumexp_x L, (K,)
    if last:
        P = exp_normal_to(L, _work(ws, 0, A_c, c, K))                               # P_T (over the spent buffer)
        sums = torch.stack([-torch.dot(P.flatten(), L.flatten()), top.exp().sum()])  # assignment_sums(L, P)
        return col, lse, P @ E, idx, sums, (P.t() @ z_c if z_c is not None else None)
    return col, lse, None, None, None, None


def _ba_forward_chunk_sums(A_c: torch.Tensor, log_q: torch.Tensor, E: torch.Tensor, last: bool,
                           z_c: torch.Tensor | None = None, ws=None):
    """``_ba_forward_chunk`` with one exp instead of two (the CPU path, where passes over memory are the
    cost): X = exp(S - max_k S), r = rowsum X, P_t = X / r, lse = max_k S + log r. Returns the chunk's
    column sums of P_t (K,) in linear space, not their log: the caller takes the log and recomputes in
    log space the columns whose total is too small for that (``_log_column_sums``). The rest as
    ``_ba_forward_chunk``: lse (c,), and at the last iteration z_q, argmax, ``assignment_sums`` and P_T^T z_c."""
    c, K = A_c.shape
    Y = torch.add(A_c, log_q, out=_work(ws, 0, A_c, c, K))                          # S = A + log Q_{t-1} (c, K)
    if last:
        m, idx = Y.max(dim=1, keepdim=True)                                          # (c, 1): argmax_k P = argmax_k S
    else:
        m = Y.amax(dim=1, keepdim=True)                                              # (c, 1)
    Y.sub_(m)                                                                        # S - max_k S <= 0
    X = exp_normal_to(Y, _work(ws, 1, A_c, c, K)) if last else exp_normal_(Y)        # in (0, 1], 1 at the max
    r = X.sum(1)                                                                     # (c,), in [1, K]
    lse = m[:, 0] + r.log()                                                          # logsumexp_k S
    inv_r = r.reciprocal()
    if not last:
        return inv_r @ X, lse, None, None, None, None                                # sum_x P_t = sum_x X / r
    P = X.mul_(inv_r[:, None])                                                       # P_T (c, K)
    # assignment_sums: H(P(.|x)) = log r - sum_k P (S - max S) (rows of P sum to 1), max_k P = 1 / r
    sums = torch.stack([r.log().sum() - torch.dot(P.flatten(), Y.flatten()), inv_r.sum()])
    return P.sum(0), lse, P @ E, idx[:, 0], sums, (P.t() @ z_c if z_c is not None else None)


def _log_column_sums(total: torch.Tensor, A: torch.Tensor, log_q: torch.Tensor, lse: torch.Tensor,
                     C: int) -> torch.Tensor:
    """log sum_x P_t(k|x) (K,) from the column sums ``total`` of ``_ba_forward_chunk_sums``, exact where
    linear space is not: an entry of P below float range's reach (3.2e-38 in float32) is 0 after
    ``exp_normal_`` (at most N x 3.2e-38 missing from a column), and a code whose every P(k|x) underflows (a
    dead or far code at a large beta) would get log Q = -inf instead of its true value (-1000, say), which
    the next iteration would use as its prior. So columns whose total is under tau = 2^40 N floor (what is
    missing then below 2^-40 of it) are recomputed in log space, logsumexp_x (A + log Q_{t-1} - lse), from A.
    (On the CPU the test of which columns needs no device synchronisation; the GPU path stays in log space.)"""
    floor = math.exp(_exp_floor(total.dtype))
    col = total.log()
    small = (total < 2.0 ** 40 * A.shape[0] * floor).nonzero()[:, 0]                # rare: far or dead codes
    if small.numel():
        part = torch.full(small.shape, -math.inf, dtype=A.dtype, device=A.device)
        for s in range(0, A.shape[0], C):
            L = A[s:s + C].index_select(1, small).add_(log_q[small]).sub_(lse[s:s + C, None])  # (c, #small)
            part = torch.logaddexp(part, logsumexp_rows(L))
        col[small] = part
    return col


def _linear_sums_by_default(device: torch.device, kernels) -> bool:
    """Whether the fused forward sums the columns of P in linear space (``_ba_forward_chunk_sums``): on the
    CPU without compiled kernels, where picking the columns for the log-space fallback (a host read) is free;
    elsewhere it stays in log space, with no device synchronisation."""
    return kernels is None and device.type == "cpu"


def _column_shift(log_cols: torch.Tensor, N: int) -> torch.Tensor:
    """shift (..., K): -col for the columns whose total mass N Q_t = exp(col) is below tau = N e tiny / eps, else 0.
    The backward works with P' = P e^shift: P_t itself in every other column (so P(k|x) is exactly 1 where the
    forward's is), and W_t = P_t / (N Q_t) (the softmax over x, at most 1) in the shifted ones, whose every
    P(k|x) may lie below float range's reach. Entries of P' below exp's floor are 0 (``exp_normal_``): what goes
    missing from a column of W is then below N e tiny / tau = eps of it in an unshifted column, and below
    N e tiny in a shifted one."""
    info = torch.finfo(log_cols.dtype)
    tau = math.log(N) + 1.0 + math.log(info.tiny) - math.log(info.eps)
    return torch.where(log_cols < tau, -log_cols, torch.zeros_like(log_cols))


def _ba_backward_chunk(A_c, lse_c, offset, E, h, scale, gzq, acc, acc_b, first: bool, ws=None):
    """One BA iteration of ``_FusedBA.backward`` on a row chunk (see the maths there). ``offset`` (K,) =
    log Q_{t-1} + shift (``_column_shift``), ``h`` (K, 2) = gq e^-shift / (N Q_t), ``scale`` (K,) = e^-shift.
    Adds this iteration's dS (both paths) to ``acc`` (c, K) and dS_b (entropy path) to ``acc_b`` (or None), or
    writes them there when ``first`` (the first iteration the backward visits: no zero fill), and returns
    (the column sums of the chunk's dS per path (K, 2): [codebook path a, entropy path b], the colsum of the
    direct term (K,) or None, P^T g_zq (K, D) or None). ``ws``: three (C, K) work buffers (``_work``)."""
    c, K = A_c.shape
    # P' = P e^shift = exp(A + log Q_{t-1} + shift - lse_t): P_t itself in every unshifted column, bit for bit
    # the forward's rounding of A + log Q_{t-1} (P(k|x) = 1 exactly where the forward's is), W_t in the shifted ones
    Pp = exp_normal_(torch.add(A_c, offset, out=_work(ws, 0, A_c, c, K)).sub_(lse_c[:, None]))
    u = Pp @ h                                                                       # (c, 2): rowsum(dL_p) = sum_k W g_p
    col = []
    for target, hp, up in ((acc_b, h[:, 1], u[:, 1:2]), (acc, h.sum(1), u.sum(1, keepdim=True))):
        if target is None:
            col.append(torch.zeros_like(hp))
            continue
        # dS = P' * (h - u e^-shift): where P(k|x) = 1 and the row's other entries are 0, u = h_k exactly and dS = 0
        # exactly, as in autograd's log_softmax backward (no product W * N Q that rounds near 1). Its column sums
        # (dlogQ_{t-1}) are summed from these entries: where they cancel, h colsum(P') - P'^T u would not.
        dS = torch.addcmul(hp[None, :], up, scale[None, :], value=-1.0,
                           out=target if first else _work(ws, 1, A_c, c, K)).mul_(Pp)
        col.append(dS.sum(0))
        if not first:
            target.add_(dS)
    col_b, col_ab = col
    m_col = g_direct = None
    if gzq is not None:                                                              # z_q = P E at t = T
        P = torch.mul(Pp, (scale == 1).to(Pp.dtype), out=_work(ws, 1, A_c, c, K))  # P_T (shifted columns: 0)
        M = torch.mm(gzq, E.t(), out=_work(ws, 2, A_c, c, K)).mul_(P)                # P * V, V = g_zq E^T
        M.addcmul_(P, M.sum(1, keepdim=True), value=-1.0)                            # dS_direct = P (V - rowsum(P V))
        m_col = M.sum(0)
        acc.add_(M)
        g_direct = P.t() @ gzq                                                       # (K, D)
    return torch.stack([col_ab - col_b, col_b], 1), m_col, g_direct


class _FusedBA(torch.autograd.Function):
    """Blahut-Arimoto soft quantization with a hand-written, row-chunked backward.

    Forward (same maths as ``blahut_arimoto``): A = -beta (d(z, E) - min_k d) is materialised once (N, K)
    (a per-row shift leaves every P_t and Q_t unchanged and keeps the logits near the best code small,
    so float32 rounds them finely); each iteration sweeps the rows in chunks, keeping only the K-vectors
    log Q_t and the N-vectors lse_t = logsumexp_k (A + log Q_{t-1}). Outputs z_q_soft = P_T E (N, D),
    log Q_T (K,) and argmax_k P_T (N,). log Q_t = log sum_x P_t(k|x) - log N comes from column sums in
    linear space with an exact log-space fallback for columns too small for it (the CPU: one exp per entry
    and iteration, ``_ba_forward_chunk_sums``) or from column logsumexps (``_ba_forward_chunk``: two exps
    and no device synchronisation: the GPU and the compiled kernels); both are tested against autograd.

    Backward (exact, derived by hand; P_t is rebuilt per chunk from A, log Q_{t-1} and lse_t):
      L_t = A + log Q_{t-1} - lse_t = log P_t,  col_t = logsumexp_x L_t = log Q_t + log N
      dlogQ_t/dL_t(x, k) = W_t(x, k) = P_t(x, k) / (N Q_t(k))   (softmax over x)
      dL_t -> dS_t = dL_t - P_t * rowsum(dL_t);  dA += dS_t;  dlogQ_{t-1} = colsum(dS_t)
      d = ||z||^2 + ||e||^2 - 2 z.e:  dz = 2 z rowsum(dd) - 2 dd E,  dE = 2 E colsum(dd) - 2 dd^T z
    With h = gq / (N Q_t) and u = P_t h (the row sums of dL = W_t * gq), dS_t = P_t * (h - u): one (C, K)
    factor per path, so each chunk and iteration is one exp (P_t), one thin product (P_t h), one update of
    each accumulator and the column sums of dS_t. Three choices keep float32 as accurate as autograd's at any
    beta (tested against float64 from beta 0.5 to 2000):
      - P_t is exp(L_t) with L_t rounded as the forward rounds it, so a row that is one-hot in the forward
        (P = 1 exactly) gives u = h_k and dS = 0 exactly, as autograd's log_softmax backward does; forming
        W_t from shifted logs and P_t as W_t N Q_t instead left rounding errors that beta 200-2000
        multiplied into the codebook gradient (errors 10-1e5 x autograd's);
      - colsum(dS_t), the next dlogQ, and colsum(dA), rowsum(dA_b) in dE and dz are summed from the
        stored entries, not taken as gq - P^T u or 0 from the columns of W summing to 1 and the rows of
        dS summing to 0: where the entries cancel, those identities leave their rounding behind;
      - a column whose mass N Q_t is below float range's reach of its entries (a far or dead code) is
        computed as W_t = P_t e^shift instead (``_column_shift``), so its dlogQ still reaches z and E.
    Entries of P below e x the smallest normal float are 0 (``exp_normal_``, for speed): gradients below about
    1e-36 (float32) that only they carry are lost, where autograd keeps them as subnormal floats.
    The rows of dS sum to 0, so the row shift of A carries no gradient.
    Contract: the gradient of log Q_T reaches z and E (entropy term); the gradient of z_q_soft
    reaches E only, directly and through P (the codebook term uses sg[z], so that path is cut).
    Per chunk and iteration the backward adds dS_t to dA (and dS_b,t to dA_b) in place (the first
    iteration it visits writes them: no zero fill); dA^T z and dA_b E are formed once at the end. So the
    whole backward has four D-wide products (those two, and g_zq E^T and P_T^T g_zq of the direct
    z_q = P_T E term), where the first version had four per iteration; the rest of its cost is passes
    over (C, K) chunks.
    Memory: A (N, K) in the forward, A, dA and dA_b (3 x (N, K)) in the backward (on the CPU dA and dA_b
    are kept between steps in the quantizer's ``BAWorkspace``: no page faults), plus two (forward)
    or three (backward) chunk-sized (C, K) work buffers allocated once per pass (``_work``), instead of
    several (N, K) matrices per iteration kept by autograd. Distances clamped at 0 are treated as exact in
    the backward.
    """

    @staticmethod
    def forward(ctx, z, E, beta, iterations: int, chunk_rows: int, kernels=None, log_q0=None, centroid_sums=False,
                workspace=None, linear_sums=None):
        fwd_chunk, _ = kernels or (_ba_forward_chunk, _ba_backward_chunk)
        N, K = z.shape[0], E.shape[0]
        C = ba_chunk_rows(N, K, chunk_rows, z.device)
        log_n = math.log(N)
        A = torch.empty(N, K, dtype=z.dtype, device=z.device)
        diag = torch.zeros(5, dtype=z.dtype, device=z.device)    # distance_sums, then assignment_sums
        e2 = E.pow(2).sum(1)                                                         # (K,)
        for s in range(0, N, C):
            # d = ||e||^2 - 2 z.e + ||z||^2 written into A's rows (as squared_distances, without its
            # three (C, K) temporaries), then A = -beta (d - min_k d): row shifts leave P and Q unchanged
            d_c = torch.addmm(e2[None, :], z[s:s + C], E.t(), alpha=-2.0, out=A[s:s + C])
            d_c.add_(z[s:s + C].pow(2).sum(1, keepdim=True)).clamp_min_(0.0)         # (C, K)
            two = d_c.topk(2, dim=1, largest=False).values                           # (C, 2) nearest two
            diag[:3] += distance_sums(d_c, two)
            d_c.sub_(two[:, :1]).mul_(-beta)                                         # -beta (d - min_k d), (C, K)
        log_qs = [torch.full((K,), -math.log(K), dtype=z.dtype, device=z.device) if log_q0 is None
                  else log_q0.detach().to(z.dtype)]                  # Q_0: uniform, or Q-bar (no gradient)
        cols = [log_qs[0]]                                   # unshifted logsumexp_x L_t (= log Q_t + log N)
        lses = torch.empty(iterations, N, dtype=z.dtype, device=z.device)  # logsumexp_k (A + log Q_{t-1}), per t
        z_q = torch.empty(N, E.shape[1], dtype=z.dtype, device=z.device)
        indices = torch.empty(N, dtype=torch.long, device=z.device)
        sums = torch.zeros(E.shape if centroid_sums else (0,), dtype=z.dtype, device=z.device)   # P_T^T z
        ws = None if kernels else [torch.empty(min(C, N), K, dtype=z.dtype, device=z.device) for _ in range(2)]
        if linear_sums is None:
            linear_sums = _linear_sums_by_default(z.device, kernels)
        if linear_sums:
            fwd_chunk = _ba_forward_chunk_sums
        for t in range(1, iterations + 1):
            # sum_x P_t(k|x) over the chunks: in linear space (linear_sums) or as a logsumexp
            col = torch.full((K,), 0.0 if linear_sums else -math.inf, dtype=z.dtype, device=z.device)
            for s in range(0, N, C):
                last = t == iterations
                col_c, lse_c, zq_c, idx_c, a_c, m_c = fwd_chunk(A[s:s + C], log_qs[-1], E, last,
                                                                z[s:s + C] if last and centroid_sums else None, ws)
                col = col.add_(col_c) if linear_sums else torch.logaddexp(col, col_c)
                lses[t - 1, s:s + C] = lse_c
                if last:
                    z_q[s:s + C] = zq_c                                             # P_T E
                    indices[s:s + C] = idx_c
                    diag[3:] += a_c
                    if centroid_sums:
                        sums += m_c
            if linear_sums:
                col = _log_column_sums(col, A, log_qs[-1], lses[t - 1], C)
            log_qs.append(col - log_n)
            cols.append(col)
        log_qs = torch.stack(log_qs)                                                 # (T+1, K)
        log_cols = torch.stack(cols)
        ctx.save_for_backward(z, E, A, log_qs, log_cols, lses,
                              beta.to(z.dtype) if torch.is_tensor(beta) else torch.tensor(beta, dtype=z.dtype))
        ctx.iterations, ctx.C, ctx.kernels, ctx.workspace = iterations, C, kernels, workspace
        ctx.mark_non_differentiable(indices, diag, sums)
        ctx.set_materialize_grads(False)                     # codebook_cost 0: no z_q_soft gradient to chase
        return z_q, log_qs[-1].clone(), indices, diag, sums

    @staticmethod
    def backward(ctx, g_zq, g_lq, _g_idx, _g_diag, _g_sums):
        z, E, A, log_qs, log_cols, lses, beta = ctx.saved_tensors
        T, C = ctx.iterations, ctx.C
        _, bwd_chunk = ctx.kernels or (_ba_forward_chunk, _ba_backward_chunk)
        N, K = A.shape
        use_a, use_b = g_zq is not None, g_lq is not None    # codebook path (E only), entropy path (z and E)
        if not (use_a or use_b):
            return None, None, None, None, None, None, None, None, None, None
        g_z, g_E = None, torch.zeros_like(E)                     # g_z: entropy path only, formed at the end
        # dlogQ_t of both paths as the columns of one (K, 2) matrix: [codebook path a, entropy path b]
        gq = torch.zeros(K, 2, dtype=A.dtype, device=A.device)
        if use_b:
            gq[:, 1] = g_lq
        ws = None if ctx.kernels else [torch.empty(min(C, N), K, dtype=A.dtype, device=A.device)
                                       for _ in range(3)]
        ws_keep = ctx.workspace if ctx.workspace is not None and A.device.type == "cpu" else BAWorkspace()
        acc = ws_keep.get("dA", A)                                    # dA = sum_t dS_t, both paths, (N, K)
        acc_b = ws_keep.get("dA_b", A) if use_b else None             # dA_b = sum_t dS_b,t (entropy path)
        shifts = _column_shift(log_cols, N)                                          # (T+1, K)
        for t in range(T, 0, -1):
            # Per row chunk, with P = P_t, W = W_t = P / (N Q_t), g_p = gq[:, p] and u_p = W g_p (the row sums of
            # dL_p = W * g_p, the logsumexp_x backward):
            #   dS_p = W * g_p - P * u_p      (log_softmax backward; rows of dS_p sum to 0)
            #        = P' * (h_p - u_p e^-shift),  P' = P e^shift, h_p = g_p e^-shift / (N Q_t)   (``_column_shift``)
            #   colsum(dS_p): summed from the entries of dS_p (``_ba_backward_chunk``)
            # dS is added to dA (and dS_b to dA_b) in place, so the iterations form no D-wide product: dA^T z and
            # dA_b E are formed once, after the loop, with the exact column and row sums of dA and dA_b. At t = T
            # the codebook path also has z_q = P E directly: dL = P * V with V = g_zq E^T,
            # dS_direct = P * (V - rowsum(P * V)) (one (C, K) matrix and two D-wide products per chunk).
            direct = use_a and t == T
            shift = shifts[t]
            scale = exp_normal(-shift)                                               # e^-shift (K,)
            h = gq * exp_normal(-shift - log_cols[t])[:, None]                       # (K, 2)
            offset = log_qs[t - 1] + shift                           # (K,)
            next_gq = torch.zeros_like(gq)
            for s in range(0, N, C):
                col, m_col, g_direct = bwd_chunk(
                    A[s:s + C], lses[t - 1, s:s + C], offset, E, h, scale,
                    g_zq[s:s + C] if direct else None, acc[s:s + C], acc_b[s:s + C] if use_b else None,
                    t == T, ws)
                next_gq += col                                                       # colsum(dS_t) per path
                if direct:
                    next_gq[:, 0] += m_col
                    g_E += g_direct                                                  # z_q = P E, direct
            gq = next_gq
        # d = ||z||^2 + ||e||^2 - 2 z.e, dd = -beta dA:  dE = -2 beta (E colsum(dA) - dA^T z),
        # dz = 2 beta (dA_b E - z rowsum(dA_b)) (only the entropy path reaches z). The column and row sums are
        # those of the stored dA and dA_b, so that where dS cancels exactly (P(k|x) = 1) these differences do too.
        ones = torch.ones(N, 1, dtype=A.dtype, device=A.device)
        zt = acc.t() @ torch.cat([z, ones], 1)                                       # [dA^T z, colsum(dA)] (K, D+1)
        g_E -= (2.0 * beta) * (E * zt[:, -1:] - zt[:, :-1])
        if use_b:
            eb = acc_b @ torch.cat([E, torch.ones(K, 1, dtype=A.dtype, device=A.device)], 1)   # [dA_b E, rowsum]
            g_z = (2.0 * beta) * (eb[:, :-1] - z * eb[:, -1:])
        return g_z, g_E, None, None, None, None, None, None, None, None


def ba_soft_quantize(z_flat: torch.Tensor, E: torch.Tensor, beta, iterations: int, chunk_rows: int = 0,
                     kernels=None, log_q0: torch.Tensor | None = None, full: bool = False,
                     centroid_sums: bool = False, workspace: "BAWorkspace | None" = None,
                     linear_sums: bool | None = None):
    """(z_q_soft = P.E (N, D), log Q (K,), argmax_k P (N,)) by ``_FusedBA`` (see its contract).
    ``kernels``: (forward chunk, backward chunk) functions, e.g. from ``compiled_ba_kernels``;
    ``log_q0``: the starting log Q (uniform when None), treated as a constant. ``full``: also the
    diagnostics' sums (5,) (``distance_sums`` of d, ``assignment_sums`` of P_T) and P_T^T z (K, D)
    (``centroid_sums``; else an empty tensor), both without gradient. ``workspace``: a ``BAWorkspace``
    whose (N, K) accumulators the CPU backward reuses from call to call (None: new ones each time).
    ``linear_sums``: the forward's column sums of P in linear space with an exact log-space fallback
    (``_ba_forward_chunk_sums``; one exp per entry and iteration) or in log space (``_ba_forward_chunk``;
    two exps, no device synchronisation); None: linear on the CPU without ``kernels``, else log space."""
    out = _FusedBA.apply(z_flat, E, beta, iterations, chunk_rows, kernels, log_q0, centroid_sums, workspace,
                         linear_sums)
    return out if full else out[:3]


def compiled_ba_kernels() -> tuple:
    """torch.compile'd ``_ba_forward_chunk`` / ``_ba_backward_chunk`` (``--compile``): the
    log_softmax / logsumexp / exp passes over each (C, K) chunk fuse into a few kernels. Always the
    default mode: CUDA graphs would reuse output buffers between the chunk calls of one step."""
    return torch.compile(_ba_forward_chunk), torch.compile(_ba_backward_chunk)

