"""The cells' pointwise math, once per cell, and the pieces every kernel shares.

A cell is a pair of ``@triton.jit`` functions, called once per step on a
(rows, units) block of every gate:

- ``<cell>_update(p, q, b, h, c) -> (h_new, c_new, saved)``: p and q are
  tuples of the gates' input-side (x W_ih^T + b_ih + the folded gates' b_hh)
  and hidden-side (h W_hh^T) pre-activations, b the tuple of the other
  gates' b_hh (empty without biases), which the cell adds where its math
  puts them (``with_bias``); c the cell state, a tuple of one block for a
  cell with two states (the LSTM's) or none, and c_new likewise; ``saved``
  is the tuple of the ``saved`` values backward reads (``fastrnn.cells``).
  h_new is the step's output before any projection (the LSTM's o tanh c).
- ``<cell>_grad(g, saved, h, h_prev, dc, c_prev) -> (dp_ih, dp_hh, skip,
  dc_prev)``: from the gradient g reaching the step's (unprojected) output
  h, the step's saved values, the state it started from and, for a cell
  state, the gradient dc reaching it from later steps and its value before
  the step (tuples of one block or none), the gates' pre-activation
  gradients on the input side and on the hidden side (the rows of W_hh's
  product), the part of the previous state's gradient that skips that
  product (one block or none: a jit function cannot return None) and the
  previous cell state's gradient (one block or none).
  A cell reads what it needs: the kernels compile out the loads it ignores.

``update`` and ``grad`` dispatch on the constexpr cell name (the
``fastrnn.cells`` name): the only place that names cells. The kernels loop
over gates and saved values with ``tl.static_range``; the description's
``gates``, ``folded_gates`` and ``saved`` reach them as constexprs.
"""

import triton
import triton.language as tl


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
def rnn_update(p, q, b, h, RELU: tl.constexpr):
    """h' = act(p + q), act tanh or ReLU (both biases folded into p); saves
    nothing (backward reads h')."""
    pre = p[0] + q[0]
    if RELU:
        # where() rather than maximum() so that NaN propagates, as torch.relu does.
        h_new = tl.where(pre < 0, 0.0, pre)
    else:
        h_new = tanh(pre)
    return h_new, ()


@triton.jit
def rnn_grad(g, saved, h, h_prev, RELU: tl.constexpr):
    """dP = g act'(P), from the step's output h; the same on both sides."""
    if RELU:
        # As torch's threshold_backward: blocked where h <= 0 only, so the
        # gradient passes where h is NaN.
        d = tl.where(h <= 0, 0.0, g)
    else:
        d = g * (1.0 - h * h)
    return (d,), (d,), ()


@triton.jit
def gru_update(p, q, b, h):
    """One GRU step, gates r | z | n, b_hn (b[0]) inside the reset product.
    Saves r | z | n | W_hn h + b_hn."""
    r = tl.sigmoid(p[0] + q[0])
    z = tl.sigmoid(p[1] + q[1])
    hn = with_bias(q[2], b, 0)
    n = tanh(p[2] + r * hn)
    return n + z * (h - n), (r, z, n, hn)


@triton.jit
def gru_grad(g, saved, h, h_prev):
    """Gate gradients from the saved r | z | n | W_hn h + b_hn and the previous
    state: input side dr | dz | dn, hidden side dr | dz | dn r; g z skips W_hh."""
    r, z, n, hn = saved[0], saved[1], saved[2], saved[3]
    dn = g * (1.0 - z) * (1.0 - n * n)
    dz = g * (h_prev - n) * z * (1.0 - z)
    dr = dn * hn * r * (1.0 - r)
    dn_hh = dn * r
    return (dr, dz, dn), (dr, dz, dn_hh), (g * z,)


@triton.jit
def lstm_update(p, q, c):
    """One LSTM step, gates i | f | g | o (every b_hh folded into p), from the
    cell state c[0]: (o tanh c', c'). Saves i | f | g | o | c'."""
    i = tl.sigmoid(p[0] + q[0])
    f = tl.sigmoid(p[1] + q[1])
    g = tanh(p[2] + q[2])
    o = tl.sigmoid(p[3] + q[3])
    c_new = f * c[0] + i * g
    return o * tanh(c_new), c_new, (i, f, g, o, c_new)


@triton.jit
def lstm_grad(dm, saved, dc, c_prev):
    """Gate gradients from dm reaching o tanh c (after the projection's
    transpose), dc[0] reaching c from later steps, the saved i | f | g | o | c
    and c_prev[0]; the same on both sides. Returns them and dc_prev = dc' f."""
    i, f, g, o, c = saved[0], saved[1], saved[2], saved[3], saved[4]
    tc = tanh(c)
    dc_total = dc[0] + dm * o * (1.0 - tc * tc)
    di = dc_total * g * i * (1.0 - i)
    df = dc_total * c_prev[0] * f * (1.0 - f)
    dg = dc_total * i * (1.0 - g * g)
    do = dm * tc * o * (1.0 - o)
    gates = (di, df, dg, do)
    return gates, gates, dc_total * f


@triton.jit
def unprojected_output(saved):
    """A projecting cell's output before W_hr, from its saved values: the
    LSTM's o tanh c (the only cell that projects), for dW_hr."""
    return saved[3] * tanh(saved[4])


@triton.jit
def with_bias(x, b, k):
    """x plus the in-loop bias b[k], or x where there are no biases (b empty)."""
    if len(b) > 0:
        x = x + b[k]
    return x


@triton.jit
def update(CELL: tl.constexpr, p, q, b, h, c):
    """``CELL``'s step: (h_new, c_new, saved)."""
    if CELL == "lstm":
        h_new, c_next, saved = lstm_update(p, q, c)
        c_new = (c_next,)
    elif CELL == "gru":
        h_new, saved = gru_update(p, q, b, h)
        c_new = ()
    else:
        h_new, saved = rnn_update(p, q, b, h, CELL == "rnn_relu")
        c_new = ()
    return h_new, c_new, saved


@triton.jit
def grad(CELL: tl.constexpr, g, saved, h, h_prev, dc, c_prev):
    """``CELL``'s step backward: (dp_ih, dp_hh, skip, dc_prev)."""
    if CELL == "lstm":
        dp_ih, dp_hh, dc_next = lstm_grad(g, saved, dc, c_prev)
        skip = ()
        dc_prev = (dc_next,)
    elif CELL == "gru":
        dp_ih, dp_hh, skip = gru_grad(g, saved, h, h_prev)
        dc_prev = ()
    else:
        dp_ih, dp_hh, skip = rnn_grad(g, saved, h, h_prev, CELL == "rnn_relu")
        dc_prev = ()
    return dp_ih, dp_hh, skip, dc_prev


@triton.jit
def keep_finished(active, new, old):
    """The tuple ``new`` where ``active`` (per row), else ``old``: finished
    sequences keep their state. Both tuples hold one block or none."""
    if len(new) > 0:
        kept = (tl.where(active[:, None], new[0], old[0]),)
    else:
        kept = ()
    return kept


@triton.jit
def forward_step(CELL: tl.constexpr, P_AT, q, biases, h, c, at, units, mask, H, WS,
                 GATES: tl.constexpr, SAVED: tl.constexpr, STATE_DTYPE: tl.constexpr):
    """One step's pointwise forward on a (rows, units) block, as every kernel
    runs it: the input side's pre-activations from P_AT (the step's rows of
    P at the block's units), the cell's update on them and the hidden side's
    q, the saved values stored to the workspace WS (None: none). Returns
    (h_new, c_new) as ``update``."""
    p = load_rows(P_AT, H, GATES, mask, STATE_DTYPE)
    h_new, c_new, saved = update(CELL, p, q, biases, h, c)
    if WS is not None:
        store_rows(WS + at * (SAVED * H) + units[None, :], H, saved, mask)
    return h_new, c_new


@triton.jit
def backward_step(CELL: tl.constexpr, g, dc, at, units, mask, H, K, OUT, PREV, PREV_C, WS,
                  UNPROJECTED, DP_IH, DP_HH, GATES: tl.constexpr, SAVED: tl.constexpr,
                  STATE_DTYPE: tl.constexpr):
    """One step's pointwise backward on a (rows, units) block, as every kernel
    runs it, from g, the gradient reaching the step's output before any
    projection, and dc, the cell state's (a tuple of one block or none).

    Reads what the cell's gradient needs (the kernels compile out what it
    ignores): the step's saved values (WS), its previous cell state
    (PREV_C), output (OUT) and previous state (PREV), the last two for the
    cells without a projection (K = H). Stores the gate gradients to DP_HH
    (and DP_IH, None where they are the same) and, with a projection
    (UNPROJECTED given), the step's output before it. Returns (dp_hh, skip,
    dc_prev) as ``grad``.
    """
    row = at * (GATES * H) + units[None, :]
    saved = ()
    if WS is not None:
        saved = load_rows(WS + at * (SAVED * H) + units[None, :], H, SAVED, mask, STATE_DTYPE)
    if UNPROJECTED is not None:
        tl.store(UNPROJECTED + at * H + units[None, :], unprojected_output(saved), mask=mask)
    c_prev = ()
    if PREV_C is not None:
        c_prev = (tl.load(PREV_C + at * H + units[None, :], mask=mask, other=0.0).to(STATE_DTYPE),)
    h_mask = mask & (units < K)[None, :]
    h = tl.load(OUT + at * K + units[None, :], mask=h_mask, other=0.0).to(STATE_DTYPE)
    h_prev = tl.load(PREV + at * K + units[None, :], mask=h_mask, other=0.0).to(STATE_DTYPE)
    dp_ih, dp_hh, skip, dc_prev = grad(CELL, g, saved, h, h_prev, dc, c_prev)
    if DP_IH is not None:
        store_rows(DP_IH + row, H, dp_ih, mask)
    store_rows(DP_HH + row, H, dp_hh, mask)
    return dp_hh, skip, dc_prev


@triton.jit
def accumulate(running, x):
    """The running sum held in ``running`` (a tuple of none or one block) plus x, as (sum,)."""
    if len(running) > 0:
        result = (running[0] + x,)
    else:
        result = (x,)
    return result


@triton.jit
def load_rows(PTR, STRIDE, COUNT: tl.constexpr, mask, DTYPE: tl.constexpr):
    """COUNT blocks at PTR, PTR + STRIDE, ..., as a tuple in ``DTYPE`` (0 where masked)."""
    blocks = ()
    for k in tl.static_range(COUNT):
        blocks = blocks + (tl.load(PTR + k * STRIDE, mask=mask, other=0.0).to(DTYPE),)
    return blocks


@triton.jit
def store_rows(PTR, STRIDE, blocks, mask):
    """Stores the tuple ``blocks`` at PTR, PTR + STRIDE, ..., in PTR's dtype."""
    for k in tl.static_range(len(blocks)):
        tl.store(PTR + k * STRIDE, blocks[k].to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def hidden_biases(B_HH, units, H, GATES: tl.constexpr, FOLDED: tl.constexpr,
                  STATE_DTYPE: tl.constexpr):
    """The hidden-side biases that stay in the loop, as (1, units) rows: B_HH
    holds gates FOLDED.. of b_hh. An empty tuple without them (None)."""
    biases = ()
    if B_HH is not None:
        for k in tl.static_range(GATES - FOLDED):
            biases = biases + (tl.load(B_HH + k * H + units, mask=units < H,
                                       other=0.0).to(STATE_DTYPE)[None, :],)
    return biases


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
