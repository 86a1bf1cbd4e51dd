"""gradscope in other people's stacks: :mod:`.tensorboard` (``TensorBoardLogger``), :mod:`.lightning`
(``GradscopeCallback``) and :mod:`.transformers` (``GradscopeCallback`` for the Hugging Face ``Trainer``). Each imports
its framework only when imported itself."""
