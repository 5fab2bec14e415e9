import numpy as np

# McMahan et al. MNIST CNN: 1,663,370 float32 values
SHAPES = [(32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,), (512, 3136), (512,), (10, 512), (10,)]


def zeros():
    return [np.zeros(s, dtype=np.float32) for s in SHAPES]
