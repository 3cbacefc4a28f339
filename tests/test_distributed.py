"""DistributedDataParallel over fastrnn modules: 2 CPU processes (gloo) train
like one process on the same global batch; a GRU with an RNNCell, and an LSTM
with proj_size and an LSTMCell (whose single-process run is also torch.nn's)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fastrnn
from conftest import assert_close

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8
SEQ_LEN = 6


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fastrnn.GRU(3, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = fastrnn.RNNCell(16, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.head(self.cell(output[:, -1]))


class LSTMModel(nn.Module):
    """A 2-layer bidirectional LSTM with a projection (4 wide, so 8 out) and
    an LSTMCell; ``namespace`` torch.nn builds the same model from torch.nn's."""

    def __init__(self, namespace=fastrnn):
        super().__init__()
        self.rnn = namespace.LSTM(3, 8, num_layers=2, batch_first=True, bidirectional=True,
                                  proj_size=4)
        self.cell = namespace.LSTMCell(8, 8)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        output, (h_n, c_n) = self.rnn(x)
        h, c = self.cell(output[:, -1], (h_n[-1].repeat(1, 2), c_n[-1]))
        return self.head(torch.cat([h, c], 1))


MODELS = {"GRU": Model, "LSTM": LSTMModel}


def _batches():
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, SEQ_LEN, 3, generator=generator),
             torch.randn(GLOBAL_BATCH, 1, generator=generator)) for _ in range(STEPS)]


def _train(model, batches, shard=slice(None)):
    """SGD steps on each batch's ``shard``; returns the last gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
    return grads


def _worker(rank, port, path, kind="GRU"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(MODELS[kind]())
        # DDP averages gradients over ranks: with equal shards that is the
        # gradient of the mean loss over the global batch.
        grads = _train(model, _batches(), slice(rank, None, WORLD))
        if rank == 0:
            torch.save({"grads": grads, "params": list(model.module.parameters())}, path)
    finally:
        dist.destroy_process_group()
    # Leave without tearing the interpreter down: freeing DDP's reducer can
    # deadlock in torch (its gloo worker thread waits for the GIL, held by
    # the thread joining it in ~ProcessGroupGloo; seen once in four runs).
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path):
    path = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(path)), nprocs=WORLD, join=True)
    distributed = torch.load(path)

    torch.manual_seed(0)
    model = Model()
    grads = _train(model, _batches())
    for got, want in zip(distributed["grads"], grads):
        assert_close(got, want, torch.float32)
    for got, want in zip(distributed["params"], model.parameters()):
        assert_close(got.detach(), want.detach(), torch.float32)
    # The run changed the parameters, so the comparison covered real steps.
    torch.manual_seed(0)
    assert not torch.equal(Model().rnn.weight_hh_l0, model.rnn.weight_hh_l0)


def test_ddp_matches_single_process_lstm(tmp_path):
    path = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(path), "LSTM"), nprocs=WORLD, join=True)
    distributed = torch.load(path)

    torch.manual_seed(0)
    model = LSTMModel()
    # torch.nn's model on the same initial parameters, trained the same way.
    reference = LSTMModel(nn)
    reference.load_state_dict(model.state_dict())
    grads = _train(model, _batches())
    expected_grads = _train(reference, _batches())
    for got, want, expected in zip(distributed["grads"], grads, expected_grads, strict=True):
        assert_close(want, expected, torch.float32)
        assert_close(got, want, torch.float32)
    for got, want, expected in zip(distributed["params"], model.parameters(),
                                   reference.parameters(), strict=True):
        assert_close(want.detach(), expected.detach(), torch.float32)
        assert_close(got.detach(), want.detach(), torch.float32)
    torch.manual_seed(0)
    assert not torch.equal(LSTMModel().rnn.weight_hr_l0, model.rnn.weight_hr_l0)
