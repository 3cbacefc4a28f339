"""The "tile" strategy: one program per batch tile owns the whole hidden state.

W_hh is loaded into registers once, before the time loop, and h stays in
registers across steps, so a step costs the recurrent product and the fused
pointwise update and nothing else. It is chosen when W_hh fits one program
(small hidden sizes). A one-row tile (batch 1, or float64) multiplies in GEMV
form; wider tiles use tl.dot.

Tensors are contiguous and time-major: the input projection P (T, B, G) with
G = H (RNN) or 3H (GRU, gates r | z | n), outputs (T, B, H), the GRU
workspace (T, B, 4H) holding r | z | n | W_hn h + b_hn of every step.
"""

import triton
import triton.language as tl

from fastrnn.triton.cells import (GRU, gru_backward_rows, gru_save, gru_update,
                                   matmul, rnn_grad, rnn_update, step_time)


@triton.jit
def _load_gate(W, gate, H, TRANSPOSE: tl.constexpr, BLOCK_H: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One gate's (H, H) block of W_hh, zero-padded to BLOCK_H: transposed
    (k, j) for the forward product h W^T, as stored (j, k) for backward's d W."""
    a = tl.arange(0, BLOCK_H)[:, None]
    b = tl.arange(0, BLOCK_H)[None, :]
    offset = (gate * H + b) * H + a if TRANSPOSE else (gate * H + a) * H + b
    w = tl.load(W + offset, mask=(a < H) & (b < H), other=0.0)
    return w.to(DOT_DTYPE)


@triton.jit(do_not_specialize=["T", "reverse"])
def tile_fwd_kernel(P, W, B_HN, H0, LENGTHS, OUT, H_N, WS, T, B, H, reverse,
                    CELL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    own = rows[:, None] * H + units[None, :]
    own_ok = (rows < B)[:, None] & unit_ok[None, :]
    if CELL == GRU:
        G = 3 * H
        w_r = _load_gate(W, 0, H, True, BLOCK_H, DOT_DTYPE)
        w_z = _load_gate(W, 1, H, True, BLOCK_H, DOT_DTYPE)
        w_n = _load_gate(W, 2, H, True, BLOCK_H, DOT_DTYPE)
        b_hn = tl.load(B_HN + units, mask=unit_ok, other=0.0).to(STATE_DTYPE)[None, :]
    else:
        G = H
        w = _load_gate(W, 0, H, True, BLOCK_H, DOT_DTYPE)
    h = tl.load(H0 + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
    length = tl.load(LENGTHS + rows, mask=rows < B, other=0)

    for s in range(0, T):
        active, t = step_time(s, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        p = P + at * G + units[None, :]
        # Padded units enter the product as 0: with an infinite state they
        # hold 0 * inf = NaN (zero weights times it), which would spread.
        operand = tl.where(unit_ok[None, :], h, 0.0).to(DOT_DTYPE)
        if CELL == GRU:
            h_new, r, z, n, hn = gru_update(
                tl.load(p, mask=mask, other=0.0).to(STATE_DTYPE),
                tl.load(p + H, mask=mask, other=0.0).to(STATE_DTYPE),
                tl.load(p + 2 * H, mask=mask, other=0.0).to(STATE_DTYPE),
                matmul(operand, w_r, USE_DOT, PRECISION).to(STATE_DTYPE),
                matmul(operand, w_z, USE_DOT, PRECISION).to(STATE_DTYPE),
                matmul(operand, w_n, USE_DOT, PRECISION).to(STATE_DTYPE),
                b_hn, h)
            gru_save(WS + at * (4 * H) + units[None, :], r, z, n, hn, H, mask)
        else:
            pre = tl.load(p, mask=mask, other=0.0).to(STATE_DTYPE)
            h_new = rnn_update(pre + matmul(operand, w, USE_DOT, PRECISION).to(STATE_DTYPE),
                               CELL)
        tl.store(OUT + at * H + units[None, :], h_new.to(OUT.dtype.element_ty), mask=mask)
        h = tl.where(active[:, None], h_new, h)
    tl.store(H_N + own, h.to(H_N.dtype.element_ty), mask=own_ok)


@triton.jit(do_not_specialize=["T", "reverse"])
def tile_bwd_kernel(GRAD_OUT, GRAD_HN, W, OUT, PREV, WS, LENGTHS, DP_IH, DP_HH, GRAD_H0,
                    T, B, H, reverse,
                    CELL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr):
    """The reverse sweep: pre-activation gradients of every step into DP_IH /
    DP_HH (T, B, G; one tensor for the RNN, where they are equal; for the GRU
    the hidden-side n rows are scaled by r) and the gradient of h0."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    own = rows[:, None] * H + units[None, :]
    own_ok = (rows < B)[:, None] & unit_ok[None, :]
    if CELL == GRU:
        G = 3 * H
        w_r = _load_gate(W, 0, H, False, BLOCK_H, DOT_DTYPE)
        w_z = _load_gate(W, 1, H, False, BLOCK_H, DOT_DTYPE)
        w_n = _load_gate(W, 2, H, False, BLOCK_H, DOT_DTYPE)
    else:
        G = H
        w = _load_gate(W, 0, H, False, BLOCK_H, DOT_DTYPE)
    # carry: the gradient reaching the state from later steps (initially from h_n).
    carry = tl.load(GRAD_HN + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
    length = tl.load(LENGTHS + rows, mask=rows < B, other=0)

    for i in range(0, T):
        active, t = step_time(T - 1 - i, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        g = tl.load(GRAD_OUT + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE) + carry
        dp = DP_HH + at * G + units[None, :]
        if CELL == GRU:
            dr, dz, dn_hh, z = gru_backward_rows(
                WS + at * (4 * H) + units[None, :], PREV + at * H + units[None, :],
                DP_IH + at * G + units[None, :], dp, g, H, mask, STATE_DTYPE)
            carry_new = (g * z
                         + matmul(dr.to(DOT_DTYPE), w_r, USE_DOT, PRECISION).to(STATE_DTYPE)
                         + matmul(dz.to(DOT_DTYPE), w_z, USE_DOT, PRECISION).to(STATE_DTYPE)
                         + matmul(dn_hh.to(DOT_DTYPE), w_n, USE_DOT, PRECISION).to(STATE_DTYPE))
        else:
            h = tl.load(OUT + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE)
            d = rnn_grad(g, h, CELL)
            tl.store(dp, d, mask=mask)
            carry_new = matmul(d.to(DOT_DTYPE), w, USE_DOT, PRECISION).to(STATE_DTYPE)
        carry = tl.where(active[:, None] & unit_ok[None, :], carry_new, carry)
    tl.store(GRAD_H0 + own, carry.to(GRAD_H0.dtype.element_ty), mask=own_ok)
