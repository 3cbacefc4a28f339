"""fastrnn: fast drop-in replacements for torch.nn.RNN, GRU, LSTM, RNNCell, GRUCell and LSTMCell."""

from fastrnn.backends import BACKENDS, current_backend, use_backend
from fastrnn.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from fastrnn.patching import convert, is_patched, patch, unconvert, unpatch

__version__ = "0.1.0"

__all__ = ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "use_backend",
           "current_backend", "BACKENDS",
           "patch", "unpatch", "is_patched", "convert", "unconvert"]
