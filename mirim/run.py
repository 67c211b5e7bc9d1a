"""The run skeleton every training command shares (train.py, dpo.py, classify.py)."""
import random


def rng_state():
    """This process's random states as plain tensors, lists and ints (safe for weights_only loading)."""
    import numpy as np
    import torch
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {'torch': torch.get_rng_state(), 'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]],
             'python': [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    import numpy as np
    import torch
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
