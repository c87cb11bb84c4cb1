"""Integrations with training frameworks; each is imported on demand (``from spectralkern.integrations.hf import ...``).

    hf.py                 transformers.Trainer (optimizer factory, callback, SpectralTrainer with the joint loss)
                          and peft models
    filter_checkpoint.py  the filter's state in a checkpoint folder (written and restored by hf.py)
"""
