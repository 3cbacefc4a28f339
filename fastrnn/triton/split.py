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

An LSTM's cell state lives in a global C (B, H) that only the program
owning its units reads and writes (its gradient likewise in DC). With a
projection W_hr (P, H), h is K = P wide and each step has a second phase
(PROJECT): the cell phase leaves o tanh c in a global M (B, H), and after
a barrier the programs owning h's columns (the first K of them) multiply
it by W_hr^T (or read the host's product, stepwise). Backward then starts
each step with the phase that turns h's gradient into DH (T, B, K), read
by every program's cell phase through W_hr.

The kernels are generic over cells (``fastrnn.triton.cells``): gates and
saved values are looped over with ``tl.static_range``; pointers a launch
does not use are None, which compiles their loads and stores out.
"""

import triton
import triton.language as tl

from fastrnn.triton.cells import (accumulate, backward_step, forward_step, grid_barrier,
                                   hidden_biases, keep_finished, matmul, program_block,
                                   step_time)


@triton.jit
def _product(V, V_STRIDE, at, rows_ok, W, W_STRIDE, units, N, R, TRANSPOSE: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
             PRECISION: tl.constexpr):
    """Columns ``units`` (< N) of V W^T (TRANSPOSE: W's rows are the units)
    or V W (W's columns are), reducing over R. V: the rows ``at`` of a global
    matrix of row stride V_STRIDE written by every program, read past L1; W:
    row stride W_STRIDE."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), STATE_DTYPE)
    unit_ok = units < N
    for k0 in range(0, R, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < R
        v = tl.load(V + at * V_STRIDE + ks[None, :], mask=rows_ok[:, None] & k_ok[None, :],
                    other=0.0, cache_modifier=".cg")
        if TRANSPOSE:
            offset = units[None, :] * W_STRIDE + ks[:, None]
        else:
            offset = ks[:, None] * W_STRIDE + units[None, :]
        w = tl.load(W + offset, mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
        acc += matmul(v.to(DOT_DTYPE), w.to(DOT_DTYPE), USE_DOT, PRECISION).to(STATE_DTYPE)
    return acc


@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def split_fwd_kernel(P, Q, W, W_HR, HR, B_HH, STATE, C, M, LENGTHS, OUT, WS, BARRIER, step_begin,
                     step_end, T, B, H, K, reverse,
                     CELL: tl.constexpr, GATES: tl.constexpr, FOLDED: tl.constexpr,
                     SAVED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr, GRID_SYNC: tl.constexpr,
                     CELL_PHASE: tl.constexpr, PROJECT: tl.constexpr):
    """Steps [step_begin, step_end) forward. STATE[s % 2] (2, B, K) holds h
    before step s (every sequence; finished ones keep theirs), C the cell
    state (None: none). Q (B, G), when given (stepwise), already holds
    STATE[s % 2] W_hh^T for the one step; else the kernel multiplies. With
    a projection (W_HR given), the CELL_PHASE writes o tanh c to M and the
    PROJECT phase writes h = M W_hr^T, read from HR (B, K) when given
    (stepwise). B_HH, WS: as the tile kernel's; BARRIER: the grid barrier's
    counters (GRID_SYNC only)."""
    rows, units, unit_ok, own, own_ok, length = program_block(LENGTHS, B, H, BLOCK_B, BLOCK_N)
    rows_ok = rows < B
    G = GATES * H
    if W_HR is None:
        K = H  # the same value: one set of offsets for h and the hidden units
    col_ok = units < K  # this program's columns of h
    own_h = rows[:, None] * K + units[None, :]
    own_h_ok = rows_ok[:, None] & col_ok[None, :]
    biases = hidden_biases(B_HH, units, H, GATES, FOLDED, STATE_DTYPE)
    syncs = 1 if W_HR is None else 2  # grid barriers per step

    for s in range(step_begin, step_end):
        state_in = STATE + (s % 2) * B * K
        state_out = STATE + ((s + 1) % 2) * B * K
        active, t = step_time(s, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        if CELL_PHASE:
            h = tl.load(state_in + own_h, mask=own_h_ok, other=0.0,
                        cache_modifier=".cg").to(STATE_DTYPE)
            if C is not None:
                c = (tl.load(C + own, mask=own_ok, other=0.0).to(STATE_DTYPE),)
            else:
                c = ()
            q = ()
            for gate in tl.static_range(GATES):
                if Q is not None:
                    q_gate = tl.load(Q + rows[:, None] * G + gate * H + units[None, :],
                                     mask=own_ok, other=0.0).to(STATE_DTYPE)
                else:
                    q_gate = _product(state_in, K, rows[:, None], rows_ok, W + gate * H * K, K,
                                      units, H, K, True, BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT,
                                      DOT_DTYPE, STATE_DTYPE, PRECISION)
                q = q + (q_gate,)
            h_new, c_new = forward_step(CELL, P + at * G + units[None, :], q, biases, h, c, at,
                                        units, mask, H, WS, GATES, SAVED, STATE_DTYPE)
            if C is not None:
                tl.store(C + own, keep_finished(active, c_new, c)[0], mask=own_ok)
            if W_HR is None:
                tl.store(OUT + at * K + units[None, :], h_new.to(OUT.dtype.element_ty), mask=mask)
                tl.store(state_out + own_h, tl.where(active[:, None], h_new, h), mask=own_h_ok)
            else:
                tl.store(M + own, h_new, mask=own_ok)
        if W_HR is not None:
            if GRID_SYNC:
                grid_barrier(BARRIER + tl.program_id(0),
                             ((s - step_begin) * syncs + 1) * tl.num_programs(1))
            if PROJECT:
                if HR is not None:
                    h_new = tl.load(HR + own_h, mask=own_h_ok, other=0.0).to(STATE_DTYPE)
                else:
                    h_new = _product(M, H, rows[:, None], rows_ok, W_HR, H, units, K, H, True,
                                     BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE, STATE_DTYPE,
                                     PRECISION)
                h = tl.load(state_in + own_h, mask=own_h_ok, other=0.0,
                            cache_modifier=".cg").to(STATE_DTYPE)
                tl.store(OUT + at * K + units[None, :], h_new.to(OUT.dtype.element_ty),
                         mask=active[:, None] & col_ok[None, :])
                tl.store(state_out + own_h, tl.where(active[:, None], h_new, h), mask=own_h_ok)
        if GRID_SYNC:
            grid_barrier(BARRIER + tl.program_id(0), (s + 1 - step_begin) * syncs * tl.num_programs(1))


@triton.jit(do_not_specialize=["T", "reverse", "step_begin", "step_end"])
def split_bwd_kernel(GRAD_OUT, W, W_HR, OUT, PREV, PREV_C, WS, LENGTHS, CARRY, DC, DH, DM,
                     DH_STEP, UNPROJECTED, DP_IH, DP_HH, DP_STEP, BARRIER, step_begin, step_end,
                     T, B, H, K, reverse,
                     CELL: tl.constexpr, GATES: tl.constexpr, SAVED: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                     PRECISION: tl.constexpr, PROJECTED: tl.constexpr, POINTWISE: tl.constexpr,
                     RECURRENT: tl.constexpr, GRID_SYNC: tl.constexpr):
    """Backward steps i in [step_begin, step_end), i counting from the last step.

    CARRY (B, K) holds the gradient reaching h from later steps, DC (B, H)
    the cell state's (None: none). Without a projection the POINTWISE phase
    turns CARRY, with the upstream gradient, into this step's gate gradients
    (DP_HH, and DP_IH where the input side's differ; with DP_STEP given
    (stepwise) also DP_STEP (B, G), zero for finished sequences, for a
    host-side GEMM) and leaves in CARRY the part that skips the product.
    With one (W_HR given), the PROJECTED phase first writes h's gradient to
    DH (and DH_STEP, stepwise) and clears CARRY, and POINTWISE starts from
    DH W_hr (read from DM (B, H) when given, stepwise) and also writes the
    step's output before the projection to UNPROJECTED (T, B, H), for
    dW_hr. The RECURRENT phase
    adds DP_HH W_hh, reading every program's gate gradients of this step.
    """
    rows, units, unit_ok, own, own_ok, length = program_block(LENGTHS, B, H, BLOCK_B, BLOCK_N)
    rows_ok = rows < B
    G = GATES * H
    if W_HR is None:
        K = H  # the same value: one set of offsets for h and the hidden units
    col_ok = units < K
    own_h = rows[:, None] * K + units[None, :]
    own_h_ok = rows_ok[:, None] & col_ok[None, :]
    syncs = 1 if W_HR is None else 2

    for i in range(step_begin, step_end):
        active, t = step_time(T - 1 - i, length, reverse)
        at = (t * B + rows)[:, None]
        mask = active[:, None] & unit_ok[None, :]
        mask_h = active[:, None] & col_ok[None, :]
        if W_HR is not None:
            if PROJECTED:
                carry = tl.load(CARRY + own_h, mask=own_h_ok, other=0.0).to(STATE_DTYPE)
                dh = tl.load(GRAD_OUT + at * K + units[None, :], mask=mask_h,
                             other=0.0).to(STATE_DTYPE) + carry
                tl.store(DH + at * K + units[None, :], dh, mask=mask_h)
                if DH_STEP is not None:
                    tl.store(DH_STEP + own_h, tl.where(active[:, None], dh, 0.0), mask=own_h_ok)
                tl.store(CARRY + own_h, tl.where(active[:, None], 0.0, carry), mask=own_h_ok)
            if GRID_SYNC:
                grid_barrier(BARRIER + tl.program_id(0),
                             ((i - step_begin) * syncs + 1) * tl.num_programs(1))
        if POINTWISE:
            if W_HR is not None:
                if DM is not None:
                    g = tl.load(DM + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
                else:
                    g = _product(DH, K, at, active, W_HR, H, units, H, K, False, BLOCK_B, BLOCK_N,
                                 BLOCK_K, USE_DOT, DOT_DTYPE, STATE_DTYPE, PRECISION)
            else:
                carry = tl.load(CARRY + own, mask=own_ok, other=0.0).to(STATE_DTYPE)
                g = tl.load(GRAD_OUT + at * K + units[None, :], mask=mask,
                            other=0.0).to(STATE_DTYPE) + carry
            if DC is not None:
                dc = (tl.load(DC + own, mask=own_ok, other=0.0).to(STATE_DTYPE),)
            else:
                dc = ()
            dp_hh, skip, dc_new = backward_step(CELL, g, dc, at, units, mask, H, K, OUT, PREV,
                                                PREV_C, WS, UNPROJECTED, DP_IH, DP_HH, GATES,
                                                SAVED, STATE_DTYPE)
            if DP_STEP is not None:
                step = DP_STEP + rows[:, None] * G + units[None, :]
                for gate in tl.static_range(GATES):
                    tl.store(step + gate * H,
                             tl.where(active[:, None], dp_hh[gate], 0.0).to(DP_STEP.dtype.element_ty),
                             mask=own_ok)
            if DC is not None:
                tl.store(DC + own, keep_finished(active, dc_new, dc)[0], mask=own_ok)
            if W_HR is None:
                if len(skip) > 0:
                    rest = skip[0]
                else:
                    rest = tl.zeros((BLOCK_B, BLOCK_N), STATE_DTYPE)
                tl.store(CARRY + own, tl.where(active[:, None], rest, carry), mask=own_ok)
        if GRID_SYNC:
            grid_barrier(BARRIER + tl.program_id(0), (i + 1 - step_begin) * syncs * tl.num_programs(1))
        if RECURRENT:
            acc = ()
            for gate in tl.static_range(GATES):
                acc = accumulate(acc, _product(
                    DP_HH + gate * H, G, at, active, W + gate * H * K, K, units, K, H, False,
                    BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, DOT_DTYPE, STATE_DTYPE, PRECISION))
            tl.debug_barrier()  # the earlier phases' stores to CARRY may come from other threads
            carry = tl.load(CARRY + own_h, mask=own_h_ok, other=0.0).to(STATE_DTYPE)
            tl.store(CARRY + own_h, carry + acc[0], mask=own_h_ok)
            tl.debug_barrier()  # and so may the next step's loads
