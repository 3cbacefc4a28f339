"""Pointwise pieces shared by every Triton kernel: cell updates, their
gradients, the recurrent product and the grid-wide barrier.

Cells are told apart by the constexpr ``CELL`` (TANH, RELU or GRU), so each
kernel is compiled once per cell with no runtime branch on it.
"""

import triton
import triton.language as tl
TANH: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
GRU: tl.constexpr = tl.constexpr(2)


@triton.jit
def tanh(x):
    """tanh from exp, accurate to a few ulp in float32 and float64.

    (1 - e) / (1 + e) with e = exp(-2|x|) loses relative accuracy as |x| -> 0
    where 1 - e cancels; there the odd Taylor series to x^7 is used, below
    the point where its truncation error drops under the rounding. Built
    from tl.exp alone, so the Triton interpreter runs the same arithmetic as
    the GPU (libdevice's tanh also spills a register in these kernels).
    """
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a + a * a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0)))
    if x.dtype == tl.float64:
        cutoff = 0.015
    else:
        cutoff = 0.15
    magnitude = tl.where(a < cutoff, small, large)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def rnn_update(pre, CELL: tl.constexpr):
    """The new state from the full pre-activation (both biases included)."""
    if CELL == RELU:
        # where() rather than maximum() so that NaN propagates, as torch.relu does.
        h = tl.where(pre < 0, 0.0, pre)
    else:
        h = tanh(pre)
    return h


@triton.jit
def rnn_grad(g, h, CELL: tl.constexpr):
    """Pre-activation gradient from the gradient g reaching the output h."""
    if CELL == RELU:
        # As torch's threshold_backward: blocked where h <= 0 only, so the
        # gradient passes where h is NaN.
        d = tl.where(h <= 0, 0.0, g)
    else:
        d = g * (1.0 - h * h)
    return d


@triton.jit
def gru_update(p_r, p_z, p_n, q_r, q_z, q_n, b_hn, h):
    """One GRU step. p: input side (b_ih, b_hr, b_hz folded in); q: W_hh h.

    Returns the new state and r, z, n, W_hn h + b_hn, which backward needs.
    """
    r = tl.sigmoid(p_r + q_r)
    z = tl.sigmoid(p_z + q_z)
    hn = q_n + b_hn
    n = tanh(p_n + r * hn)
    return n + z * (h - n), r, z, n, hn


@triton.jit
def gru_save(ws, r, z, n, hn, H, mask):
    """Stores a step's r | z | n | W_hn h + b_hn at the workspace rows ws."""
    tl.store(ws, r, mask=mask)
    tl.store(ws + H, z, mask=mask)
    tl.store(ws + 2 * H, n, mask=mask)
    tl.store(ws + 3 * H, hn, mask=mask)


@triton.jit
def gru_backward_rows(ws, h_prev, dp_ih, dp_hh, g, H, mask, STATE_DTYPE: tl.constexpr):
    """One GRU step backward from the gradient g reaching its output.

    Reads the step's saved gates (workspace rows ws) and previous state,
    stores the gate pre-activation gradients on the input side (dr | dz | dn)
    and the hidden side (dr | dz | dn r), and returns (dr, dz, dn r, z).
    """
    r = tl.load(ws, mask=mask, other=0.0)
    z = tl.load(ws + H, mask=mask, other=0.0)
    n = tl.load(ws + 2 * H, mask=mask, other=0.0)
    hn = tl.load(ws + 3 * H, mask=mask, other=0.0)
    h = tl.load(h_prev, mask=mask, other=0.0).to(STATE_DTYPE)
    dn = g * (1.0 - z) * (1.0 - n * n)
    dz = g * (h - n) * z * (1.0 - z)
    dr = dn * hn * r * (1.0 - r)
    dn_hh = dn * r
    tl.store(dp_ih, dr, mask=mask)
    tl.store(dp_ih + H, dz, mask=mask)
    tl.store(dp_ih + 2 * H, dn, mask=mask)
    tl.store(dp_hh, dr, mask=mask)
    tl.store(dp_hh + H, dz, mask=mask)
    tl.store(dp_hh + 2 * H, dn_hh, mask=mask)
    return dr, dz, dn_hh, z


@triton.jit
def matmul(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b. tl.dot needs every dimension >= 16; a one-row a (batch 1) or
    float64 takes the GEMV form, a broadcast product summed over k."""
    if USE_DOT:
        c = tl.dot(a, b, input_precision=PRECISION)
    else:
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return c


@triton.jit
def grid_barrier(counter, target):
    """Waits until ``counter`` (int32, monotonically increasing) reaches ``target``
    after adding this program's arrival. Every program taking part must be
    co-resident (grid <= number of SMs). Data written before it by any
    program must be read after it with cache_modifier=".cg" (L1 is not coherent).
    """
    tl.debug_barrier()  # every thread's stores issued before the arrival
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while arrived < target:
        arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def program_block(LENGTHS, B, H, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """What program (i, j) owns: batch rows i*BLOCK_B.. and hidden units
    j*BLOCK_N.. (a 1-D grid owns units from 0), their masks, the (B, H)
    offsets of its block and each row's sequence length (0 past B)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    unit_ok = units < H
    own = rows[:, None] * H + units[None, :]
    own_ok = (rows < B)[:, None] & unit_ok[None, :]
    length = tl.load(LENGTHS + rows, mask=rows < B, other=0)
    return rows, units, unit_ok, own, own_ok, length


@triton.jit
def step_time(s, length, reverse):
    """Which time each sequence of a tile is at on step s, and whether it is
    still running (s < its length). Reversed sequences start at their own
    last element. Finished sequences get time 0, always a valid address."""
    active = s < length
    t = tl.where(reverse != 0, length - 1 - s, s)
    return active, tl.where(active, t, 0).to(tl.int64)
