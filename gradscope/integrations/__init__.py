"""gradscope in other people's stacks: :mod:`.tensorboard` (``TensorBoardLogger``) and :mod:`.lightning`
(``GradscopeCallback``). Each imports its framework only when imported itself."""
