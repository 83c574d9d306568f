"""Triton kernels of the selective scan (Mamba-1, eq. 2a-2b) and of its one-step update.

Only ``@triton.jit`` functions live here; :mod:`pks4.ssm.scan_triton` imports this file (in the mode, compiled
or interpreted, that Triton itself was imported in) and launches them.

Layout of the work: one program per (sequence, block of ``BLOCK_D`` channels). The program walks time in chunks
of ``CHUNK`` steps; inside a chunk the recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(delta_t A), b_t = delta_t
B_t u_t, eq. 2a) is solved for all steps at once by ``tl.associative_scan`` over (a, b) pairs, and the state is
carried from chunk to chunk in registers. Every sum is float32, whatever the input dtype.

The backward pass never sees per-step states from the forward: the forward writes the state at the start of
every group of ``GROUP`` chunks (``ckpt``), and the backward walks the groups in reverse, replays one group
forward to recover its chunk-start states (in a small per-program scratch buffer), then walks that group's
chunks in reverse, recomputing each chunk's states and solving the adjoint recurrence
dh_t = a_{t+1} dh_{t+1} + C_t dy_t. The adjoint is a forward scan over the chunk read in reversed time order
(then flipped back), rather than ``associative_scan(reverse=True)``, whose argument order for a
non-commutative combine has varied between Triton releases.

Per-channel-block partial sums of dB and dC, and per-sequence partial sums of dA, dD and d(delta_bias), are
written out and reduced by the caller in a fixed order, so results are the same on every run (no atomics).
"""
import triton
import triton.language as tl


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    """Compose two steps of h -> a h + b, the earlier one on the left."""
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow; log1p written out (the interpreter's libdevice has no log1p):
    log1p(e) = log(1 + e) * e / ((1 + e) - 1) is exact to rounding for small e."""
    e = tl.exp(-tl.abs(x))
    one_plus = 1.0 + e
    rounded = one_plus - 1.0
    log1p = tl.where(rounded == 0.0, e, tl.log(one_plus) * (e / tl.where(rounded == 0.0, 1.0, rounded)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _column(x, index, K: tl.constexpr):
    """x[:, :, index] of a (rows, cols, K) tile."""
    return tl.sum(tl.where((tl.arange(0, K) == index)[None, None, :], x, 0.0), axis=2)


@triton.jit
def _step_sizes(delta_ptr, sdl_b, sdl_d, sdl_l, b, offs_d, mask_d, ts, L, bias, SOFTPLUS: tl.constexpr):
    """delta + delta_bias before softplus, and the step size actually used (0 outside the sequence)."""
    mask = mask_d[:, None] & (ts < L)[None, :]
    raw = tl.load(delta_ptr + b * sdl_b + offs_d[:, None] * sdl_d + ts[None, :] * sdl_l, mask=mask,
                  other=0.0).to(tl.float32) + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _channel_block(blk, dim, N, A_ptr, sA_d, sA_n, bias_ptr, D_ptr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
                   BLOCK_D: tl.constexpr, N_PAD: tl.constexpr):
    """A program's channels and states (with masks for the padding), and its rows of A, delta_bias and D."""
    offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d, mask_n = offs_d < dim, offs_n < N
    A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_d[:, None] & mask_n[None, :],
                other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, offs_n, mask_d, mask_n, A, bias, Dv


@triton.jit
def _chunk_states(h0, ts, b, offs_d, mask_d, offs_n, mask_n, A, bias, L,
                  u_ptr, su_b, su_d, su_l, delta_ptr, sdl_b, sdl_d, sdl_l, B_ptr, sB_b, sB_n, sB_l,
                  SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr):
    """States h_t of one chunk, (BLOCK_D, N_PAD, CHUNK), from the state h0 before it (eq. 2a).

    Past the end of the sequence the step size is 0 (a = 1, b = 0), so the last column is the state after the
    chunk's last real step. Also returns what the backward pass needs again: u, delta before softplus, the
    step size, B and b_t = delta_t B_t u_t.
    """
    mask_t = ts < L
    u = tl.load(u_ptr + b * su_b + offs_d[:, None] * su_d + ts[None, :] * su_l,
                mask=mask_d[:, None] & mask_t[None, :], other=0.0).to(tl.float32)
    raw, dt = _step_sizes(delta_ptr, sdl_b, sdl_d, sdl_l, b, offs_d, mask_d, ts, L, bias, SOFTPLUS)
    Bc = tl.load(B_ptr + b * sB_b + offs_n[:, None] * sB_n + ts[None, :] * sB_l,
                 mask=mask_n[:, None] & mask_t[None, :], other=0.0).to(tl.float32)
    decay = tl.exp(dt[:, None, :] * A[:, :, None])                   # a_t = exp(delta_t A)
    inject = (dt * u)[:, None, :] * Bc[None, :, :]                   # b_t = delta_t B_t u_t
    first = (tl.arange(0, CHUNK) == 0)[None, None, :]
    carried = tl.where(first, decay * h0[:, :, None], 0.0)           # a_0 h0 enters with the first step
    _, h = tl.associative_scan((decay, inject + carried), 2, _affine_combine)
    return h, u, raw, dt, Bc, inject


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
    L, dim, N,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sA_d, sA_n, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sz_b, sz_d, sz_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LAST: tl.constexpr, HAS_CKPT: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
):
    """out (batch, dim, L), last state (batch, dim, N) and group-start states ckpt (batch, groups - 1, dim, N)."""
    b = tl.program_id(0).to(tl.int64)
    offs_d, offs_n, mask_d, mask_n, A, bias, Dv = _channel_block(
        tl.program_id(1), dim, N, A_ptr, sA_d, sA_n, bias_ptr, D_ptr, HAS_BIAS, HAS_D, BLOCK_D, N_PAD)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_offs = offs_d[:, None] * N + offs_n[None, :]                # (dim, N) slab of ckpt / last
    h = tl.zeros((BLOCK_D, N_PAD), tl.float32)
    kept = (L + CHUNK * GROUP - 1) // (CHUNK * GROUP) - 1                # group-start states after the first
    for c in range(0, (L + CHUNK - 1) // CHUNK):
        if HAS_CKPT:
            if (c % GROUP == 0) & (c > 0):
                tl.store(ckpt_ptr + (b * kept + c // GROUP - 1) * dim * N + state_offs, h, mask=mask_dn)
        ts = c * CHUNK + tl.arange(0, CHUNK)
        hs, u, _, _, _, _ = _chunk_states(h, ts, b, offs_d, mask_d, offs_n, mask_n, A, bias, L,
                                          u_ptr, su_b, su_d, su_l, delta_ptr, sdl_b, sdl_d, sdl_l,
                                          B_ptr, sB_b, sB_n, sB_l, SOFTPLUS, CHUNK)
        mask_t = ts < L
        Cc = tl.load(C_ptr + b * sC_b + offs_n[:, None] * sC_n + ts[None, :] * sC_l,
                     mask=mask_n[:, None] & mask_t[None, :], other=0.0).to(tl.float32)
        y = tl.sum(hs * Cc[None, :, :], axis=1) + Dv[:, None] * u     # eq. 2b: C_t h_t + D u_t
        mask_out = mask_d[:, None] & mask_t[None, :]
        if HAS_Z:
            zc = tl.load(z_ptr + b * sz_b + offs_d[:, None] * sz_d + ts[None, :] * sz_l, mask=mask_out,
                         other=0.0).to(tl.float32)
            y = y * zc * _sigmoid(zc)                                  # the Mamba block's silu(z) gate
        tl.store(out_ptr + (b * dim + offs_d[:, None]) * L + ts[None, :], y, mask=mask_out)
        h = _column(hs, CHUNK - 1, CHUNK)
    if HAS_LAST:
        tl.store(last_ptr + b * dim * N + state_offs, h, mask=mask_dn)


@triton.jit
def _adjoint(dh_next, ts, b, offs_d, mask_d, offs_n, mask_n, A, bias, L,
             delta_ptr, sdl_b, sdl_d, sdl_l, C_ptr, sC_b, sC_n, sC_l, z_ptr, sz_b, sz_d, sz_l,
             dout_ptr, so_b, so_d, so_l,
             HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr):
    """dL/dh_t over one chunk, (BLOCK_D, N_PAD, CHUNK) in time order, from dh_next = dL/dh at the first step
    after the chunk: dh_t = a_{t+1} dh_{t+1} + C_t dy_t, solved as a forward scan over the chunk's steps read
    last first, then flipped back to time order."""
    tr = ts + CHUNK - 1 - 2 * tl.arange(0, CHUNK)                      # the chunk's steps, last first
    mask_r = mask_d[:, None] & (tr < L)[None, :]
    dy = tl.load(dout_ptr + b * so_b + offs_d[:, None] * so_d + tr[None, :] * so_l, mask=mask_r,
                 other=0.0).to(tl.float32)
    if HAS_Z:
        zr = tl.load(z_ptr + b * sz_b + offs_d[:, None] * sz_d + tr[None, :] * sz_l, mask=mask_r,
                     other=0.0).to(tl.float32)
        dy = dy * zr * _sigmoid(zr)                                    # through the gate: dL/dy
    Cr = tl.load(C_ptr + b * sC_b + offs_n[:, None] * sC_n + tr[None, :] * sC_l,
                 mask=mask_n[:, None] & (tr < L)[None, :], other=0.0).to(tl.float32)
    _, dt_next = _step_sizes(delta_ptr, sdl_b, sdl_d, sdl_l, b, offs_d, mask_d, tr + 1, L, bias, SOFTPLUS)
    decay_next = tl.exp(dt_next[:, None, :] * A[:, :, None])           # a_{t+1} (1 past the end)
    first = (tl.arange(0, CHUNK) == 0)[None, None, :]
    carried = tl.where(first, decay_next * dh_next[:, :, None], 0.0)
    _, dh_rev = tl.associative_scan((decay_next, Cr[None, :, :] * dy[:, None, :] + carried), 2, _affine_combine)
    return tl.flip(dh_rev, 2)


@triton.jit
def _replay_group(h, c0, c1, scratch, b, offs_d, mask_d, offs_n, mask_n, A, bias, L,
                  u_ptr, su_b, su_d, su_l, delta_ptr, sdl_b, sdl_d, sdl_l, B_ptr, sB_b, sB_n, sB_l,
                  SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, SLOT: tl.constexpr):
    """Run chunks c0 .. c1 - 2 forward from the group's start state h; the start state of chunk c0 + 1 + j goes
    to scratch slot j (the program's own)."""
    for c in range(c0, c1 - 1):
        ts = c * CHUNK + tl.arange(0, CHUNK)
        hs, _, _, _, _, _ = _chunk_states(h, ts, b, offs_d, mask_d, offs_n, mask_n, A, bias, L,
                                          u_ptr, su_b, su_d, su_l, delta_ptr, sdl_b, sdl_d, sdl_l,
                                          B_ptr, sB_b, sB_n, sB_l, SOFTPLUS, CHUNK)
        h = _column(hs, CHUNK - 1, CHUNK)
        tl.store(scratch + (c - c0) * SLOT, h)


@triton.jit
def _chunk_backward(h0, dh, ts, b, dim, offs_d, mask_d, offs_n, mask_n, A, bias, Dv, L, part,
                    u_ptr, su_b, su_d, su_l, delta_ptr, sdl_b, sdl_d, sdl_l, B_ptr, sB_b, sB_n, sB_l,
                    C_ptr, sC_b, sC_n, sC_l, z_ptr, sz_b, sz_d, sz_l, dout_ptr, so_b, so_d, so_l,
                    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr,
                    HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk of the backward pass from its start state h0 and dh = dL/dh after it: writes du, ddelta, dz and
    the chunk's dB, dC partials; returns (dL/dh before the chunk, and its dA, dD, d delta_bias sums)."""
    hs, u, raw, dt, Bc, inject = _chunk_states(h0, ts, b, offs_d, mask_d, offs_n, mask_n, A, bias, L,
                                               u_ptr, su_b, su_d, su_l, delta_ptr, sdl_b, sdl_d, sdl_l,
                                               B_ptr, sB_b, sB_n, sB_l, SOFTPLUS, CHUNK)
    mask_t = ts < L
    mask_dt, mask_nt = mask_d[:, None] & mask_t[None, :], mask_n[:, None] & mask_t[None, :]
    Cc = tl.load(C_ptr + b * sC_b + offs_n[:, None] * sC_n + ts[None, :] * sC_l, mask=mask_nt,
                 other=0.0).to(tl.float32)
    dy = tl.load(dout_ptr + b * so_b + offs_d[:, None] * so_d + ts[None, :] * so_l, mask=mask_dt,
                 other=0.0).to(tl.float32)
    grad_offs = (b * dim + offs_d[:, None]) * L + ts[None, :]
    if HAS_Z:  # out = y silu(z): dz = dout y silu'(z), dy = dout silu(z)
        zc = tl.load(z_ptr + b * sz_b + offs_d[:, None] * sz_d + ts[None, :] * sz_l, mask=mask_dt,
                     other=0.0).to(tl.float32)
        sz = _sigmoid(zc)
        y = tl.sum(hs * Cc[None, :, :], axis=1) + Dv[:, None] * u
        tl.store(dz_ptr + grad_offs, dy * y * sz * (1.0 + zc * (1.0 - sz)), mask=mask_dt)
        dy = dy * zc * sz
    tl.store(dC_ptr + part + ts[None, :], tl.sum(hs * dy[:, None, :], axis=0), mask=mask_nt)
    dhs = _adjoint(dh, ts, b, offs_d, mask_d, offs_n, mask_n, A, bias, L,
                   delta_ptr, sdl_b, sdl_d, sdl_l, C_ptr, sC_b, sC_n, sC_l, z_ptr, sz_b, sz_d, sz_l,
                   dout_ptr, so_b, so_d, so_l, HAS_Z, SOFTPLUS, CHUNK)
    h_decayed = hs - inject                                            # a_t h_{t-1}
    ddt = tl.sum(dhs * (h_decayed * A[:, :, None] + u[:, None, :] * Bc[None, :, :]), axis=1)
    tl.store(du_ptr + grad_offs, dt * tl.sum(dhs * Bc[None, :, :], axis=1) + dy * Dv[:, None], mask=mask_dt)
    tl.store(dB_ptr + part + ts[None, :], tl.sum(dhs * (dt * u)[:, None, :], axis=0), mask=mask_nt)
    ddelta = ddt
    if SOFTPLUS:
        ddelta = ddt * _sigmoid(raw)
    ddelta = tl.where(mask_dt, ddelta, 0.0)
    tl.store(ddelta_ptr + grad_offs, ddelta, mask=mask_dt)
    return (_column(dhs, 0, CHUNK), tl.sum(dhs * h_decayed * dt[:, None, :], axis=2), tl.sum(dy * u, axis=1),
            tl.sum(ddelta, axis=1))


@triton.jit
def selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    L, dim, N, slots,
    su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sA_d, sA_n, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sz_b, sz_d, sz_l,
    so_b, so_d, so_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
):
    """Gradients of every input. du, ddelta, dz: (batch, dim, L); partial sums dA (batch, dim, N), dB and dC
    (batch, channel blocks, N, L), dD and dbias (batch, dim), reduced by the caller."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs_d, offs_n, mask_d, mask_n, A, bias, Dv = _channel_block(
        blk, dim, N, A_ptr, sA_d, sA_n, bias_ptr, D_ptr, HAS_BIAS, HAS_D, BLOCK_D, N_PAD)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    scratch = scratch_ptr + (b * tl.num_programs(1) + blk) * slots * BLOCK_D * N_PAD \
        + tl.arange(0, BLOCK_D)[:, None] * N_PAD + offs_n[None, :]    # this program's own slots
    part = (b * tl.num_programs(1) + blk) * N * L + offs_n[:, None] * L  # its rows of the dB / dC partials
    dh = tl.zeros((BLOCK_D, N_PAD), tl.float32)
    if HAS_DLAST:
        dh = tl.load(dlast_ptr + b * dim * N + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    dA = tl.zeros((BLOCK_D, N_PAD), tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    n_chunks = (L + CHUNK - 1) // CHUNK
    n_groups = (n_chunks + GROUP - 1) // GROUP
    for gg in range(0, n_groups):                                      # checkpoint groups, last first
        g = n_groups - 1 - gg
        c0 = g * GROUP
        c1 = tl.minimum(c0 + GROUP, n_chunks)
        if g > 0:
            h_group = tl.load(ckpt_ptr + (b * (n_groups - 1) + g - 1) * dim * N + state_offs, mask=mask_dn,
                              other=0.0)
        else:
            h_group = tl.zeros((BLOCK_D, N_PAD), tl.float32)
        _replay_group(h_group, c0, c1, scratch, b, offs_d, mask_d, offs_n, mask_n, A, bias, L,
                      u_ptr, su_b, su_d, su_l, delta_ptr, sdl_b, sdl_d, sdl_l, B_ptr, sB_b, sB_n, sB_l,
                      SOFTPLUS, CHUNK, BLOCK_D * N_PAD)
        tl.debug_barrier()
        for cc in range(0, c1 - c0):                                   # the group's chunks, last first
            c = c1 - 1 - cc
            if c > c0:
                h0 = tl.load(scratch + (c - c0 - 1) * BLOCK_D * N_PAD)
            else:
                h0 = h_group
            dh, dA_c, dD_c, dbias_c = _chunk_backward(
                h0, dh, c * CHUNK + tl.arange(0, CHUNK), b, dim, offs_d, mask_d, offs_n, mask_n, A, bias, Dv, L,
                part, u_ptr, su_b, su_d, su_l, delta_ptr, sdl_b, sdl_d, sdl_l, B_ptr, sB_b, sB_n, sB_l,
                C_ptr, sC_b, sC_n, sC_l, z_ptr, sz_b, sz_d, sz_l, dout_ptr, so_b, so_d, so_l,
                du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, HAS_Z, SOFTPLUS, CHUNK)
            dA += dA_c
            dD += dD_c
            dbias += dbias_c
        tl.debug_barrier()  # the next group's replay reuses the scratch slots
    tl.store(dA_ptr + b * dim * N + state_offs, dA, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + b * dim + offs_d, dD, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * dim + offs_d, dbias, mask=mask_d)


@triton.jit
def selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    dim, N,
    ss_b, ss_d, ss_n, sx_b, sx_d, sdt_b, sdt_d, sA_d, sA_n, sB_b, sB_n, sC_b, sC_n, sz_b, sz_d, so_b, so_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
):
    """One step of eq. 2a-2b: the state (batch, dim, N) is updated in place, y (batch, dim) written."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    mask_d, mask_n = offs_d < dim, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_at = state_ptr + b * ss_b + offs_d[:, None] * ss_d + offs_n[None, :] * ss_n
    h = tl.load(state_at, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * sx_b + offs_d * sx_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * sdt_b + offs_d * sdt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * sB_b + offs_n * sB_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * sC_b + offs_n * sC_n, mask=mask_n, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_at, h, mask=mask_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * sz_b + offs_d * sz_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * _sigmoid(z)
    tl.store(out_ptr + b * so_b + offs_d * so_d, y, mask=mask_d)
