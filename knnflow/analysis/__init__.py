"""The paper's analyses: collapse of the softmax, velocity error of a trained network, hybrid
sampling, Fréchet distances with offline features, and the digits reproduction."""
