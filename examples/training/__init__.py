"""Training of the ADST examples, split by job.

- ``models``: build the model and the criterion from train.py's flags, export, count parameters.
- ``loop``: loaders, ``train_one_epoch``, ``evaluate`` (every use of the model's outputs and of the loss).
- ``checkpoints``: checkpoints, RNG states and seeds, JSON / CSV logs.
- ``distributed``: torchrun's DDP context, device choice, autocast, machine description.
- ``plots``: curves and test overlays.
"""
