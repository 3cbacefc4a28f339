"""The "tile" strategy: one program per batch tile owns the whole hidden state.

W_hh is loaded into registers once, before the time loop, and h stays in
registers across steps, so a step costs the recurrent product and the fused
pointwise update and nothing else. It is chosen when W_hh fits one program
(small hidden sizes). A one-row tile (batch 1, or float64) multiplies in GEMV
form; wider tiles use tl.dot.

Tensors are contiguous and time-major: the input projection P (T, B, G) with
G = GATES * H (gate blocks stacked as in the weights), outputs (T, B, K), the
workspace (T, B, SAVED * H) holding every step's saved values. K is the
width of h: H, or P for an LSTM with a projection W_hr (P, H), which the
program then also keeps in registers and applies inside the time loop. An
LSTM's cell state c (B, H) stays in registers beside h. The kernels
are generic over cells (``fastrnn.triton.cells``): they loop over gates with
``tl.static_range`` and keep W_hh as a tuple of per-gate register blocks.
"""

import triton
import triton.language as tl

from fastrnn.triton.cells import (accumulate, backward_step, forward_step, hidden_biases,
                                   keep_finished, matmul, step_time)


@triton.jit
def _load_gates(W, N, K, GATES: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Each gate's (N, K) block of W (GATES * N, K), zero-padded, as a tuple:
    transposed, (BLOCK_K, BLOCK_N), for a product v W^T; as stored,
    (BLOCK_N, BLOCK_K), for a product d W."""
    if TRANSPOSE:
        k = tl.arange(0, BLOCK_K)[:, None]
        n = tl.arange(0, BLOCK_N)[None, :]
    else:
        n = tl.arange(0, BLOCK_N)[:, None]
        k = tl.arange(0, BLOCK_K)[None, :]
    blocks = ()
    for gate in tl.static_range(GATES):
        blocks = blocks + (tl.load(W + (gate * N + n) * K + k, mask=(n < N) & (k < K),
                                   other=0.0).to(DOT_DTYPE),)
    return blocks


@triton.jit
def _load_cell_state(C, own, own_ok, STATE_DTYPE: tl.constexpr):
    """The cell state's block at C as a tuple of one, or none where C is None."""
    if C is not None:
        c = (tl.load(C + own, mask=own_ok, other=0.0).to(STATE_DTYPE),)
    else:
        c = ()
    return c


@triton.jit
def _store_cell_state(C, own, c, own_ok):
    if C is not None:
        tl.store(C + own, c[0].to(C.dtype.element_ty), mask=own_ok)


@triton.jit(do_not_specialize=["T", "reverse"])
def tile_fwd_kernel(P, W, W_HR, B_HH, H0, C0, LENGTHS, OUT, H_N, C_N, WS, T, B, H, K, reverse,
                    CELL: tl.constexpr, GATES: tl.constexpr, FOLDED: tl.constexpr,
                    SAVED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The forward time loop. W_HR: the projection (None: none, K = H);
    B_HH: gates FOLDED.. of b_hh, the hidden biases that stay in the loop
    (None: none); C0, C_N: the cell state (None: the cell has none); WS: the
    workspace (None: saves nothing)."""
    if W_HR is None:
        K = H  # the same value: one set of offsets for h and the hidden units
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    cols = tl.arange(0, BLOCK_K)  # h's columns
    col_ok = cols < K
    own = rows[:, None] * H + units[None, :]
    own_ok = row_ok[:, None] & unit_ok[None, :]
    own_h = rows[:, None] * K + cols[None, :]
    own_h_ok = row_ok[:, None] & col_ok[None, :]
    G = GATES * H
    w = _load_gates(W, H, K, GATES, True, BLOCK_H, BLOCK_K, DOT_DTYPE)
    if W_HR is not None:
        w_hr = _load_gates(W_HR, K, H, 1, True, BLOCK_K, BLOCK_H, DOT_DTYPE)
    biases = hidden_biases(B_HH, units, H, GATES, FOLDED, STATE_DTYPE)
    h = tl.load(H0 + own_h, mask=own_h_ok, other=0.0).to(STATE_DTYPE)
    c = _load_cell_state(C0, own, own_ok, STATE_DTYPE)
    length = tl.load(LENGTHS + rows, mask=row_ok, other=0)

    for s in range(0, T):
        active, t = step_time(s, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        # Padded units enter the product as 0: with an infinite state they
        # hold 0 * inf = NaN (zero weights times it), which would spread.
        operand = tl.where(col_ok[None, :], h, 0.0).to(DOT_DTYPE)
        q = ()
        for gate in tl.static_range(GATES):
            q = q + (matmul(operand, w[gate], USE_DOT, PRECISION).to(STATE_DTYPE),)
        h_new, c_new = forward_step(CELL, P + at * G + units[None, :], q, biases, h, c, at, units,
                                    mask, H, WS, GATES, SAVED, STATE_DTYPE)
        if W_HR is not None:
            m = tl.where(unit_ok[None, :], h_new, 0.0).to(DOT_DTYPE)
            h_new = matmul(m, w_hr[0], USE_DOT, PRECISION).to(STATE_DTYPE)
        tl.store(OUT + at * K + cols[None, :], h_new.to(OUT.dtype.element_ty),
                 mask=active[:, None] & col_ok[None, :])
        h = tl.where(active[:, None], h_new, h)
        c = keep_finished(active, c_new, c)
    tl.store(H_N + own_h, h.to(H_N.dtype.element_ty), mask=own_h_ok)
    _store_cell_state(C_N, own, c, own_ok)


@triton.jit(do_not_specialize=["T", "reverse"])
def tile_bwd_kernel(GRAD_OUT, GRAD_HN, GRAD_CN, W, W_HR, OUT, PREV, PREV_C, WS, LENGTHS, DP_IH,
                    DP_HH, DH, UNPROJECTED, GRAD_H0, GRAD_C0, T, B, H, K, reverse,
                    CELL: tl.constexpr, GATES: tl.constexpr, SAVED: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr):
    """The reverse sweep: pre-activation gradients of every step into DP_HH
    (T, B, G) and, where the input side's differ (unfolded gates), DP_IH
    (None: they are DP_HH), the gradients of h0 and (GRAD_CN given) c0, and
    with a projection W_HR the gradient reaching each step's h into DH
    (T, B, K) and the step's output before it into UNPROJECTED (T, B, H),
    from which the host takes dW_hr."""
    if W_HR is None:
        K = H  # the same value: one set of offsets for h and the hidden units
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    own = rows[:, None] * H + units[None, :]
    own_ok = row_ok[:, None] & unit_ok[None, :]
    own_h = rows[:, None] * K + cols[None, :]
    own_h_ok = row_ok[:, None] & col_ok[None, :]
    w = _load_gates(W, H, K, GATES, False, BLOCK_H, BLOCK_K, DOT_DTYPE)
    if W_HR is not None:
        w_hr = _load_gates(W_HR, K, H, 1, False, BLOCK_K, BLOCK_H, DOT_DTYPE)
    # carry: the gradient reaching h from later steps (initially from h_n);
    # dc: the cell state's.
    carry = tl.load(GRAD_HN + own_h, mask=own_h_ok, other=0.0).to(STATE_DTYPE)
    dc = _load_cell_state(GRAD_CN, own, own_ok, STATE_DTYPE)
    length = tl.load(LENGTHS + rows, mask=row_ok, other=0)

    for i in range(0, T):
        active, t = step_time(T - 1 - i, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        mask_h = active[:, None] & col_ok[None, :]
        g = tl.load(GRAD_OUT + at * K + cols[None, :], mask=mask_h, other=0.0).to(STATE_DTYPE) + carry
        if W_HR is not None:
            tl.store(DH + at * K + cols[None, :], g.to(DH.dtype.element_ty), mask=mask_h)
            g = matmul(tl.where(col_ok[None, :], g, 0.0).to(DOT_DTYPE), w_hr[0], USE_DOT,
                       PRECISION).to(STATE_DTYPE)
        dp_hh, carry_new, dc_new = backward_step(CELL, g, dc, at, units, mask, H, K, OUT, PREV,
                                                 PREV_C, WS, UNPROJECTED, DP_IH, DP_HH, GATES,
                                                 SAVED, STATE_DTYPE)
        # h's gradient: the part skipping W_hh, plus each gate's product.
        for gate in tl.static_range(GATES):
            carry_new = accumulate(carry_new, matmul(dp_hh[gate].to(DOT_DTYPE), w[gate], USE_DOT,
                                                     PRECISION).to(STATE_DTYPE))
        carry = tl.where(mask_h, carry_new[0], carry)
        dc = keep_finished(active, dc_new, dc)
    tl.store(GRAD_H0 + own_h, carry.to(GRAD_H0.dtype.element_ty), mask=own_h_ok)
    _store_cell_state(GRAD_C0, own, dc, own_ok)
