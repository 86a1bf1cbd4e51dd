"""The CIFAR-10 comparison app built on gradscope (``gradscope compare``): model zoo (:mod:`.models`), data
(:mod:`.data`) and the training loop with its tables and figures (:mod:`.compare`).

Not part of the library's API: ``gradscope`` itself never imports it. It shows the textbook story (vanishing
gradients in deep sigmoid MLPs, plain vs residual CNNs, RNN vs LSTM/GRU through time) with real numbers.
"""
