"""The "split" and "stepwise" strategies: programs split the hidden units.

Program (i, j) owns batch tile i and the hidden units of column block j.

- **split** (larger hidden sizes): one persistent launch runs every step.
  The grid is at most the number of SMs so that all programs are
  co-resident; each step's state goes through a double-buffered global
  STATE (2, B, H) and the programs of a batch tile meet at a grid barrier
  once per step. The recurrent product streams W_hh from L2.
- **stepwise** (large batch, where the recurrent GEMM dominates): the host
  runs the recurrent product with cuBLAS each step and launches the same
  kernel for the fused pointwise part only (EXTERNAL_Q / POINTWISE alone).

``GRID_SYNC`` compiles the barrier in. Without it the host launches the
kernel once per step (``step_begin``/``step_end``), and in backward once
per phase, which is also how the Triton interpreter, which runs programs
one after another, checks the same arithmetic.
"""

import triton
import triton.language as tl

from fastrnn.triton.cells import (GRU, grid_barrier, gru_backward_rows, gru_save,
                                   gru_update, matmul, program_block, rnn_grad, rnn_update,
                                   step_time)


@triton.jit
def _recurrent_product(V, at, rows_ok, W, gate, units, H, G, TRANSPOSE: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Columns ``units`` of V W_g^T (forward, TRANSPOSE) or V_g W_g (backward),
    with V the rows ``at`` of a global (., G or H) matrix written by every
    program, read past L1."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), STATE_DTYPE)
    unit_ok = units < H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        if TRANSPOSE:
            v = tl.load(V + at * H + ks[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0,
                        cache_modifier=".cg")
            w = tl.load(W + (gate * H + units[None, :]) * H + ks[:, None],
                        mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
        else:
            v = tl.load(V + at * G + gate * H + ks[None, :], mask=rows_ok[:, None] & k_ok[None, :],
                        other=0.0, cache_modifier=".cg")
            w = tl.load(W + (gate * H + ks[:, None]) * H + units[None, :],
                        mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
        acc += matmul(v.to(DOT_DTYPE), w.to(DOT_DTYPE), USE_DOT, PRECISION).to(STATE_DTYPE)
    return acc


@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def split_fwd_kernel(P, Q, W, B_HN, STATE, LENGTHS, OUT, WS, BARRIER, step_begin, step_end,
                     T, B, H, reverse,
                     CELL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     EXTERNAL_Q: tl.constexpr, GRID_SYNC: tl.constexpr):
    """Steps [step_begin, step_end) forward. STATE[s % 2] holds the state
    before step s (every sequence; finished ones keep theirs). With
    EXTERNAL_Q, Q (B, G) already holds STATE[s % 2] W_hh^T for the one step."""
    rows, units, unit_ok, own, own_ok, length = program_block(LENGTHS, B, H, BLOCK_B, BLOCK_N)
    rows_ok = rows < B
    G = 3 * H if CELL == GRU else H
    if CELL == GRU:
        b_hn = tl.load(B_HN + units, mask=unit_ok, other=0.0).to(STATE_DTYPE)[None, :]

    for s in range(step_begin, step_end):
        state_in = STATE + (s % 2) * B * H
        state_out = STATE + ((s + 1) % 2) * B * H
        active, t = step_time(s, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        p = P + at * G + units[None, :]
        h = tl.load(state_in + own, mask=own_ok, other=0.0, cache_modifier=".cg").to(STATE_DTYPE)
        if EXTERNAL_Q:
            q = Q + rows[:, None] * G + units[None, :]
            q_r = tl.load(q, mask=own_ok, other=0.0).to(STATE_DTYPE)
        else:
            q_r = _recurrent_product(state_in, rows[:, None], rows_ok, W, 0, units, H, G, True,
                                     BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE, STATE_DTYPE,
                                     PRECISION)
        if CELL == GRU:
            if EXTERNAL_Q:
                q_z = tl.load(q + H, mask=own_ok, other=0.0).to(STATE_DTYPE)
                q_n = tl.load(q + 2 * H, mask=own_ok, other=0.0).to(STATE_DTYPE)
            else:
                q_z = _recurrent_product(state_in, rows[:, None], rows_ok, W, 1, units, H, G, True,
                                         BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE,
                                         STATE_DTYPE, PRECISION)
                q_n = _recurrent_product(state_in, rows[:, None], rows_ok, W, 2, units, H, G, True,
                                         BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE,
                                         STATE_DTYPE, PRECISION)
            h_new, r, z, n, hn = gru_update(
                tl.load(p, mask=mask, other=0.0).to(STATE_DTYPE),
                tl.load(p + H, mask=mask, other=0.0).to(STATE_DTYPE),
                tl.load(p + 2 * H, mask=mask, other=0.0).to(STATE_DTYPE),
                q_r, q_z, q_n, b_hn, h)
            gru_save(WS + at * (4 * H) + units[None, :], r, z, n, hn, H, mask)
        else:
            h_new = rnn_update(tl.load(p, mask=mask, other=0.0).to(STATE_DTYPE) + q_r, CELL)
        tl.store(OUT + at * H + units[None, :], h_new.to(OUT.dtype.element_ty), mask=mask)
        tl.store(state_out + own, tl.where(active[:, None], h_new, h), mask=own_ok)
        if GRID_SYNC:
            grid_barrier(BARRIER + tl.program_id(0), (s + 1 - step_begin) * tl.num_programs(1))


@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def split_bwd_kernel(GRAD_OUT, W, OUT, PREV, WS, LENGTHS, CARRY, DP_IH, DP_HH, DP_STEP, BARRIER,
                     step_begin, step_end, T, B, H, reverse,
                     CELL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     POINTWISE: tl.constexpr, RECURRENT: tl.constexpr, WRITE_STEP: tl.constexpr,
                     GRID_SYNC: tl.constexpr):
    """Backward steps i in [step_begin, step_end), i counting from the last step.

    CARRY (B, H) holds the gradient reaching the state from later steps. The
    POINTWISE phase turns it, with the upstream gradient, into this step's
    gate gradients (DP_IH / DP_HH, and with WRITE_STEP also DP_STEP (B, G),
    zero for finished sequences, for a host-side GEMM) and leaves in CARRY
    the part that skips the product (GRU: g z). The RECURRENT phase adds
    DP_HH W_hh, reading every program's gate gradients of this step.
    """
    rows, units, unit_ok, own, own_ok, length = program_block(LENGTHS, B, H, BLOCK_B, BLOCK_N)
    G = 3 * H if CELL == GRU else H

    for i in range(step_begin, step_end):
        active, t = step_time(T - 1 - i, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        if POINTWISE:
            carry = tl.load(CARRY + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
            g = tl.load(GRAD_OUT + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE) + carry
            dp = DP_HH + at * G + units[None, :]
            step = DP_STEP + rows[:, None] * G + units[None, :]
            if CELL == GRU:
                dr, dz, dn_hh, z = gru_backward_rows(
                    WS + at * (4 * H) + units[None, :], PREV + at * H + units[None, :],
                    DP_IH + at * G + units[None, :], dp, g, H, mask, STATE_DTYPE)
                if WRITE_STEP:
                    keep = active[:, None]
                    tl.store(step, tl.where(keep, dr, 0.0).to(DP_STEP.dtype.element_ty), mask=own_ok)
                    tl.store(step + H, tl.where(keep, dz, 0.0).to(DP_STEP.dtype.element_ty), mask=own_ok)
                    tl.store(step + 2 * H, tl.where(keep, dn_hh, 0.0).to(DP_STEP.dtype.element_ty),
                             mask=own_ok)
                skip = g * z
            else:
                h = tl.load(OUT + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE)
                d = rnn_grad(g, h, CELL)
                tl.store(dp, d, mask=mask)
                if WRITE_STEP:
                    tl.store(step, tl.where(active[:, None], d, 0.0).to(DP_STEP.dtype.element_ty),
                             mask=own_ok)
                skip = tl.zeros((BLOCK_B, BLOCK_N), STATE_DTYPE)
            tl.store(CARRY + own, tl.where(active[:, None], skip, carry), mask=own_ok)
        if GRID_SYNC:
            grid_barrier(BARRIER + tl.program_id(0), (i + 1 - step_begin) * tl.num_programs(1))
        if RECURRENT:
            acc = _recurrent_product(DP_HH, at, active, W, 0, units, H, G, False, BLOCK_B, BLOCK_N,
                                     BLOCK_K, USE_DOT, DOT_DTYPE, STATE_DTYPE, PRECISION)
            if CELL == GRU:
                acc += _recurrent_product(DP_HH, at, active, W, 1, units, H, G, False, BLOCK_B,
                                          BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE, STATE_DTYPE,
                                          PRECISION)
                acc += _recurrent_product(DP_HH, at, active, W, 2, units, H, G, False, BLOCK_B,
                                          BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE, STATE_DTYPE,
                                          PRECISION)
            tl.debug_barrier()  # the POINTWISE stores to CARRY may come from other threads
            carry = tl.load(CARRY + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
            tl.store(CARRY + own, carry + acc, mask=own_ok)
            tl.debug_barrier()  # and so may the next step's loads
