"""Bring-your-own-loop examples: ringattn inside a Hugging Face ``Trainer`` / TRL ``SFTTrainer``
(``hf_trainer_sp.py``) or an accelerate loop (``accelerate_sp.py``), on the tiny model and data
of ``tiny_hf.py``. They take argparse flags (``--sp-size 2``), not Hydra overrides: they mirror
the Hugging Face example scripts a user starts from, whose own flags they keep.
"""
