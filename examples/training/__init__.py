"""Training of the ADST examples, split by job.

- ``engine``: the one training step and the epoch over any iterable of batches, the optimisation, the LR default.
- ``batches``: where batches come from: a DataLoader (train.py) or the on-device dataset cache (the study).
- ``evaluation``: the one evaluation path (per-epoch validation and the final validation/test).
- ``parts`` and ``fit``: train.py's run: what it builds once, then epochs with checkpoints and logs, export,
  test.
- ``models``: build the model and the criterion from the model flags, export, count parameters.
- ``checkpoints``: checkpoints, RNG states and seeds, JSON / CSV logs.
- ``distributed``: torchrun's DDP context, device choice, AMP choice, backends, machine description.
- ``plots``: curves of the logged loss terms and scores, and test overlays.
"""
