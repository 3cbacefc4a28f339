"""The "split" and "stepwise" strategies: programs split the hidden units.

Program (i, j) owns batch tile i and the hidden units of column block j.

- **split** (larger hidden sizes): one persistent launch runs every step.
  The grid is at most the number of SMs so that all programs are
  co-resident; each step's state goes through a double-buffered global
  STATE (2, B, H) and the programs of a batch tile meet at a grid barrier
  once per step. The recurrent product streams W_hh from L2.
- **stepwise** (large batch, where the recurrent GEMM dominates): the host
  runs the recurrent product with cuBLAS each step and launches the same
  kernel for the fused pointwise part only (forward: Q given; backward:
  POINTWISE alone, writing DP_STEP).

``GRID_SYNC`` compiles the barrier in. Without it the host launches the
kernel once per step (``step_begin``/``step_end``), and in backward once
per phase, which is also how the Triton interpreter, which runs programs
one after another, checks the same arithmetic.

The kernels are generic over cells (``fastrnn.triton.cells``): gates and
saved values are looped over with ``tl.static_range``; pointers a launch
does not use are None, which compiles their loads and stores out.
"""

import triton
import triton.language as tl

from fastrnn.triton.cells import (accumulate, grad, grid_barrier, hidden_biases,
                                   load_rows, matmul, program_block, step_time, store_rows,
                                   update)


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
def split_fwd_kernel(P, Q, W, B_HH, STATE, LENGTHS, OUT, WS, BARRIER, step_begin, step_end,
                     T, B, H, reverse,
                     CELL: tl.constexpr, GATES: tl.constexpr, FOLDED: tl.constexpr,
                     SAVED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr, GRID_SYNC: tl.constexpr):
    """Steps [step_begin, step_end) forward. STATE[s % 2] holds the state
    before step s (every sequence; finished ones keep theirs). Q (B, G), when
    given (stepwise), already holds STATE[s % 2] W_hh^T for the one step;
    else the kernel multiplies. B_HH, WS: as the tile kernel's; BARRIER: the
    grid barrier's counters (GRID_SYNC only)."""
    rows, units, unit_ok, own, own_ok, length = program_block(LENGTHS, B, H, BLOCK_B, BLOCK_N)
    rows_ok = rows < B
    G = GATES * H
    biases = hidden_biases(B_HH, units, H, GATES, FOLDED, STATE_DTYPE)

    for s in range(step_begin, step_end):
        state_in = STATE + (s % 2) * B * H
        state_out = STATE + ((s + 1) % 2) * B * H
        active, t = step_time(s, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        p_at = P + at * G + units[None, :]
        h = tl.load(state_in + own, mask=own_ok, other=0.0, cache_modifier=".cg").to(STATE_DTYPE)
        q = ()
        for gate in tl.static_range(GATES):
            if Q is not None:
                q_gate = tl.load(Q + rows[:, None] * G + gate * H + units[None, :], mask=own_ok,
                                 other=0.0).to(STATE_DTYPE)
            else:
                q_gate = _recurrent_product(state_in, rows[:, None], rows_ok, W, gate, units, H, G,
                                            True, BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE,
                                            STATE_DTYPE, PRECISION)
            q = q + (q_gate,)
        p = load_rows(p_at, H, GATES, mask, STATE_DTYPE)
        h_new, saved = update(CELL, p, q, biases, h)
        if WS is not None:
            store_rows(WS + at * (SAVED * H) + units[None, :], H, saved, mask)
        tl.store(OUT + at * H + units[None, :], h_new.to(OUT.dtype.element_ty), mask=mask)
        tl.store(state_out + own, tl.where(active[:, None], h_new, h), mask=own_ok)
        if GRID_SYNC:
            grid_barrier(BARRIER + tl.program_id(0), (s + 1 - step_begin) * tl.num_programs(1))


@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def split_bwd_kernel(GRAD_OUT, W, OUT, PREV, WS, LENGTHS, CARRY, DP_IH, DP_HH, DP_STEP, BARRIER,
                     step_begin, step_end, T, B, H, reverse,
                     CELL: tl.constexpr, GATES: tl.constexpr, SAVED: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr, POINTWISE: tl.constexpr, RECURRENT: tl.constexpr,
                     GRID_SYNC: tl.constexpr):
    """Backward steps i in [step_begin, step_end), i counting from the last step.

    CARRY (B, H) holds the gradient reaching the state from later steps. The
    POINTWISE phase turns it, with the upstream gradient, into this step's
    gate gradients (DP_HH, and DP_IH where the input side's differ; with
    DP_STEP given (stepwise) also DP_STEP (B, G), zero for finished
    sequences, for a host-side GEMM) and leaves in CARRY the part that skips
    the product. The RECURRENT phase adds DP_HH W_hh, reading every
    program's gate gradients of this step.
    """
    rows, units, unit_ok, own, own_ok, length = program_block(LENGTHS, B, H, BLOCK_B, BLOCK_N)
    G = GATES * H

    for i in range(step_begin, step_end):
        active, t = step_time(T - 1 - i, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        if POINTWISE:
            carry = tl.load(CARRY + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
            g = tl.load(GRAD_OUT + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE) + carry
            dp_hh_at = DP_HH + at * G + units[None, :]
            step = DP_STEP + rows[:, None] * G + units[None, :] if DP_STEP is not None else None
            ws_at = WS + at * (SAVED * H) + units[None, :] if WS is not None else None
            prev_at = PREV + at * H + units[None, :]
            dp_ih_at = DP_IH + at * G + units[None, :] if DP_IH is not None else None
            # What the cell's gradient reads (the kernel compiles out what it ignores).
            saved = ()
            if WS is not None:
                saved = load_rows(ws_at, H, SAVED, mask, STATE_DTYPE)
            h = tl.load(OUT + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE)
            h_prev = tl.load(prev_at, mask=mask, other=0.0).to(STATE_DTYPE)
            dp_ih, dp_hh, skip = grad(CELL, g, saved, h, h_prev)
            if DP_IH is not None:
                store_rows(dp_ih_at, H, dp_ih, mask)
            store_rows(dp_hh_at, H, dp_hh, mask)
            if DP_STEP is not None:
                for gate in tl.static_range(GATES):
                    tl.store(step + gate * H,
                             tl.where(active[:, None], dp_hh[gate], 0.0).to(DP_STEP.dtype.element_ty),
                             mask=own_ok)
            if len(skip) > 0:
                rest = skip[0]
            else:
                rest = tl.zeros((BLOCK_B, BLOCK_N), STATE_DTYPE)
            tl.store(CARRY + own, tl.where(active[:, None], rest, carry), mask=own_ok)
        if GRID_SYNC:
            grid_barrier(BARRIER + tl.program_id(0), (i + 1 - step_begin) * tl.num_programs(1))
        if RECURRENT:
            acc = ()
            for gate in tl.static_range(GATES):
                acc = accumulate(acc, _recurrent_product(
                    DP_HH, at, active, W, gate, units, H, G, False, BLOCK_B, BLOCK_N, BLOCK_K,
                    USE_DOT, DOT_DTYPE, STATE_DTYPE, PRECISION))
            tl.debug_barrier()  # the POINTWISE stores to CARRY may come from other threads
            carry = tl.load(CARRY + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
            tl.store(CARRY + own, carry + acc[0], mask=own_ok)
            tl.debug_barrier()  # and so may the next step's loads
