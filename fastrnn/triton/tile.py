"""The "tile" strategy: one program per batch tile owns the whole hidden state.

W_hh is loaded into registers once, before the time loop, and h stays in
registers across steps, so a step costs the recurrent product and the fused
pointwise update and nothing else. It is chosen when W_hh fits one program
(small hidden sizes). A one-row tile (batch 1, or float64) multiplies in GEMV
form; wider tiles use tl.dot.

Tensors are contiguous and time-major: the input projection P (T, B, G) with
G = GATES * H (gate blocks stacked as in the weights), outputs (T, B, H), the
workspace (T, B, SAVED * H) holding every step's saved values. The kernels
are generic over cells (``fastrnn.triton.cells``): they loop over gates with
``tl.static_range`` and keep W_hh as a tuple of per-gate register blocks.
"""

import triton
import triton.language as tl

from fastrnn.triton.cells import (accumulate, grad, hidden_biases, load_rows,
                                   matmul, step_time, store_rows, update)


@triton.jit
def _load_gates(W, H, GATES: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_DTYPE: tl.constexpr):
    """Each gate's (H, H) block of W_hh, zero-padded to BLOCK_H, as a tuple:
    transposed (k, j) for the forward product h W^T, as stored (j, k) for
    backward's d W."""
    a = tl.arange(0, BLOCK_H)[:, None]
    b = tl.arange(0, BLOCK_H)[None, :]
    blocks = ()
    for gate in tl.static_range(GATES):
        offset = (gate * H + b) * H + a if TRANSPOSE else (gate * H + a) * H + b
        blocks = blocks + (tl.load(W + offset, mask=(a < H) & (b < H), other=0.0).to(DOT_DTYPE),)
    return blocks


@triton.jit(do_not_specialize=["T", "reverse"])
def tile_fwd_kernel(P, W, B_HH, H0, LENGTHS, OUT, H_N, WS, T, B, H, reverse,
                    CELL: tl.constexpr, GATES: tl.constexpr, FOLDED: tl.constexpr,
                    SAVED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                    PRECISION: tl.constexpr):
    """The forward time loop. B_HH: gates FOLDED.. of b_hh, the hidden biases
    that stay in the loop (None: none); WS: the workspace (None: saves nothing)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    own = rows[:, None] * H + units[None, :]
    own_ok = (rows < B)[:, None] & unit_ok[None, :]
    G = GATES * H
    w = _load_gates(W, H, GATES, True, BLOCK_H, DOT_DTYPE)
    biases = hidden_biases(B_HH, units, H, GATES, FOLDED, STATE_DTYPE)
    h = tl.load(H0 + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
    length = tl.load(LENGTHS + rows, mask=rows < B, other=0)

    for s in range(0, T):
        active, t = step_time(s, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        p_at = P + at * G + units[None, :]
        # Padded units enter the product as 0: with an infinite state they
        # hold 0 * inf = NaN (zero weights times it), which would spread.
        operand = tl.where(unit_ok[None, :], h, 0.0).to(DOT_DTYPE)
        p = load_rows(p_at, H, GATES, mask, STATE_DTYPE)
        q = ()
        for gate in tl.static_range(GATES):
            q = q + (matmul(operand, w[gate], USE_DOT, PRECISION).to(STATE_DTYPE),)
        h_new, saved = update(CELL, p, q, biases, h)
        if WS is not None:
            store_rows(WS + at * (SAVED * H) + units[None, :], H, saved, mask)
        tl.store(OUT + at * H + units[None, :], h_new.to(OUT.dtype.element_ty), mask=mask)
        h = tl.where(active[:, None], h_new, h)
    tl.store(H_N + own, h.to(H_N.dtype.element_ty), mask=own_ok)


@triton.jit(do_not_specialize=["T", "reverse"])
def tile_bwd_kernel(GRAD_OUT, GRAD_HN, W, OUT, PREV, WS, LENGTHS, DP_IH, DP_HH, GRAD_H0,
                    T, B, H, reverse,
                    CELL: tl.constexpr, GATES: tl.constexpr, SAVED: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, USE_DOT: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The reverse sweep: pre-activation gradients of every step into DP_HH
    (T, B, G) and, where the input side's differ (unfolded gates), DP_IH
    (None: they are DP_HH), and the gradient of h0."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    own = rows[:, None] * H + units[None, :]
    own_ok = (rows < B)[:, None] & unit_ok[None, :]
    G = GATES * H
    w = _load_gates(W, H, GATES, False, BLOCK_H, DOT_DTYPE)
    # carry: the gradient reaching the state from later steps (initially from h_n).
    carry = tl.load(GRAD_HN + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
    length = tl.load(LENGTHS + rows, mask=rows < B, other=0)

    for i in range(0, T):
        active, t = step_time(T - 1 - i, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        g = tl.load(GRAD_OUT + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE) + carry
        dp_hh_at = DP_HH + at * G + units[None, :]
        ws_at = WS + at * (SAVED * H) + units[None, :] if WS is not None else None
        prev_at = PREV + at * H + units[None, :]
        dp_ih_at = DP_IH + at * G + units[None, :] if DP_IH is not None else None
        # What the cell's gradient reads (the kernel compiles out what it ignores).
        saved = ()
        if WS is not None:
            saved = load_rows(ws_at, H, SAVED, mask, STATE_DTYPE)
        h = tl.load(OUT + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE)
        h_prev = tl.load(prev_at, mask=mask, other=0.0).to(STATE_DTYPE)
        dp_ih, dp_hh, carry_new = grad(CELL, g, saved, h, h_prev)
        if DP_IH is not None:
            store_rows(dp_ih_at, H, dp_ih, mask)
        store_rows(dp_hh_at, H, dp_hh, mask)
        # The state's gradient: the part skipping W_hh, plus each gate's product.
        for gate in tl.static_range(GATES):
            carry_new = accumulate(carry_new, matmul(dp_hh[gate].to(DOT_DTYPE), w[gate], USE_DOT,
                                                     PRECISION).to(STATE_DTYPE))
        carry = tl.where(active[:, None] & unit_ok[None, :], carry_new[0], carry)
    tl.store(GRAD_H0 + own, carry.to(GRAD_H0.dtype.element_ty), mask=own_ok)
