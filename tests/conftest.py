"""Test settings: small networks run fastest on one thread (the machine has 2 cores)."""

import torch

torch.set_num_threads(1)
